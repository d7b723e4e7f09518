use super::*;

#[test]
fn defaults_need_no_file() {
    let c = Config::from_file(ConfigFile::default()).unwrap();
    assert_eq!(c.listen.port(), 8080);
    assert_eq!(c.control_listen.to_string(), "127.0.0.1:8081");
    assert_eq!(c.base_url, "http://localhost:8080/");
    assert_eq!(c.upstream.base_path, "/fhir/R4");
    assert!(c.store_url.starts_with("sqlite://"));
}

#[test]
fn bad_values_are_one_line_errors() {
    let f = ConfigFile {
        trusted_proxies: vec!["nonsense".into()],
        ..Default::default()
    };
    let e = Config::from_file(f).unwrap_err().to_string();
    assert!(e.contains("trusted_proxies"), "{e}");
    let f = ConfigFile {
        upstream: Some("ftp://x".into()),
        ..Default::default()
    };
    assert!(
        Config::from_file(f)
            .unwrap_err()
            .to_string()
            .contains("upstream")
    );
    let f = ConfigFile {
        access_token_lifetime: Some("300".into()),
        ..Default::default()
    };
    assert!(
        Config::from_file(f)
            .unwrap_err()
            .to_string()
            .contains("access_token_lifetime")
    );
}

#[test]
fn lifetimes_follow_medplum_syntax() {
    assert_eq!(parse_lifetime("60s"), Some(Duration::from_secs(60)));
    assert_eq!(parse_lifetime("2w"), Some(Duration::from_secs(1_209_600)));
    assert_eq!(parse_lifetime("300"), None);
    assert_eq!(parse_lifetime("medplum"), None);
    assert_eq!(parse_lifetime(""), None);
}

#[test]
fn smtp_settings_are_checked() {
    let c = Config::from_file(ConfigFile::default()).unwrap();
    assert!(c.smtp.is_none(), "no SMTP: the outbox");
    assert_eq!(c.mail_from, "no-reply@localhost");
    assert!(!c.register_enabled);
    let f = ConfigFile {
        smtp_host: Some("mail.example".into()),
        smtp_username: Some("u".into()),
        smtp_password: Some("p".into()),
        base_url: Some("https://fhir.example.org/".into()),
        ..Default::default()
    };
    let c = Config::from_file(f).unwrap();
    let smtp = c.smtp.unwrap();
    assert_eq!((smtp.port, smtp.tls), (587, SmtpTls::StartTls));
    assert!(
        !format!("{smtp:?}").contains("\"p\""),
        "the password never prints"
    );
    assert_eq!(c.mail_from, "no-reply@fhir.example.org");
    for (f, key) in [
        (
            ConfigFile {
                smtp_port: Some(25),
                ..Default::default()
            },
            "smtp_host",
        ),
        (
            ConfigFile {
                smtp_host: Some("h".into()),
                smtp_tls: Some("ssl".into()),
                ..Default::default()
            },
            "smtp_tls",
        ),
        (
            ConfigFile {
                smtp_host: Some("h".into()),
                smtp_username: Some("u".into()),
                ..Default::default()
            },
            "smtp_username",
        ),
        (
            ConfigFile {
                smtp_from: Some("not a mailbox".into()),
                ..Default::default()
            },
            "smtp_from",
        ),
    ] {
        let e = Config::from_file(f).unwrap_err().to_string();
        assert!(e.contains(key), "{e}");
    }
    let f = ConfigFile {
        smtp_host: Some("h".into()),
        smtp_tls: Some("tls".into()),
        ..Default::default()
    };
    assert_eq!(Config::from_file(f).unwrap().smtp.unwrap().port, 465);
}

#[test]
fn flags_win_over_file() {
    let file = ConfigFile {
        listen: Some("0.0.0.0:1".into()),
        upstream: Some("http://a:1/fhir".into()),
        ..Default::default()
    };
    let flags = ConfigFile {
        listen: Some("0.0.0.0:2".into()),
        ..Default::default()
    };
    let c = Config::from_file(flags.layered_over(file)).unwrap();
    assert_eq!(c.listen.port(), 2);
    assert_eq!(c.upstream.host, "a");
}
#[test]
fn control_url_is_a_name_or_the_local_listener() {
    let c = Config::from_file(ConfigFile {
        control_listen: Some("0.0.0.0:9001".into()),
        ..Default::default()
    })
    .unwrap();
    assert_eq!(c.control_url.url, "http://127.0.0.1:9001");
    assert_eq!(
        (c.control_url.host.as_str(), c.control_url.port),
        ("127.0.0.1", 9001)
    );
    let c = Config::from_file(ConfigFile {
        control_url: Some("http://control:8081/".into()),
        ..Default::default()
    })
    .unwrap();
    assert_eq!(c.control_url.host, "control");
    assert_eq!(c.control_url.port, 8081);
    assert!(!c.control_url.tls);
    let https = ControlUrl::parse("https://[::1]").unwrap();
    assert_eq!(
        (https.host.as_str(), https.port, https.tls),
        ("::1", 443, true)
    );
    for bad in [
        "control:8081",
        "ftp://control:21",
        "http://control:8081/api",
        "http://u:p@control:8081",
        "http://control:8081/?x=1",
    ] {
        let e = Config::from_file(ConfigFile {
            control_url: Some(bad.into()),
            ..Default::default()
        })
        .unwrap_err()
        .to_string();
        assert!(e.contains("control_url"), "{bad}: {e}");
    }
}

#[test]
fn rotation_and_outage_durations_are_checked() {
    let c = Config::from_file(ConfigFile::default()).unwrap();
    assert_eq!(c.key_publish_delay, Duration::from_secs(60));
    assert_eq!(c.store_outage_ttl, Duration::from_secs(600));
    assert_eq!(c.token_cache_ttl, Duration::from_secs(3600));
    let e = Config::from_file(ConfigFile {
        store_outage_ttl: Some("soon".into()),
        ..Default::default()
    })
    .unwrap_err()
    .to_string();
    assert!(e.contains("store_outage_ttl"), "{e}");
}
