use super::*;

#[test]
fn secrets_are_160_bit_base32() {
    let s = new_secret();
    assert_eq!(s.len(), 32);
    assert!(
        s.bytes()
            .all(|b| b.is_ascii_uppercase() || (b'2'..=b'7').contains(&b))
    );
    assert_ne!(s, new_secret());
}

#[test]
fn enroll_uri_has_medplums_shape() {
    assert_eq!(
        enroll_uri("a.b@example.com", "JBSWY3DPEHPK3PXP"),
        "otpauth://totp/Medplum%20-%20a.b%40example.com?secret=JBSWY3DPEHPK3PXP&issuer=medplum.com"
    );
}

#[test]
fn qr_code_is_a_png_data_url() {
    let url = qr_data_url("otpauth://totp/x?secret=JBSWY3DPEHPK3PXP").unwrap();
    let b64 = url.strip_prefix("data:image/png;base64,").unwrap();
    let png = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
}

/// RFC 6238 Appendix B, SHA-1, truncated to 6 digits.
#[test]
fn rfc6238_vectors() {
    // "12345678901234567890" in base32.
    let secret = "GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ";
    assert_eq!(code_at(secret, 59).as_deref(), Some("287082"));
    assert_eq!(code_at(secret, 1_111_111_109).as_deref(), Some("081804"));
    assert_eq!(code_at(secret, 1_234_567_890).as_deref(), Some("005924"));
    assert_eq!(code_at(secret, 20_000_000_000).as_deref(), Some("353130"));
}

#[test]
fn codes_are_accepted_one_step_either_side() {
    let secret = new_secret();
    let now = 1_700_000_000u64;
    let code = code_at(&secret, now).unwrap();
    let step = now / 30;
    assert_eq!(check_code(&secret, &code, now), Some(step));
    assert_eq!(check_code(&secret, &code, now + 30), Some(step));
    assert_eq!(check_code(&secret, &code, now - 30), Some(step));
    assert_eq!(check_code(&secret, &code, now + 60), None);
    let spaced = format!("{} {}", &code[..3], &code[3..]);
    assert_eq!(check_code(&secret, &spaced, now), Some(step));
}

#[test]
fn malformed_codes_and_secrets_fail() {
    let secret = new_secret();
    for bad in ["", "12345", "1234567", "abcdef", "12345x", "１２３４５６"] {
        assert_eq!(check_code(&secret, bad, 1_700_000_000), None, "{bad}");
    }
    assert_eq!(check_code("not base32!", "123456", 1_700_000_000), None);
    // Too short to be a secret (40 bits).
    assert_eq!(check_code("GEZDGNBV", "123456", 1_700_000_000), None);
}
