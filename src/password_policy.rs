//! What a new password must be: long enough, at most 72 bytes (Medplum's bcrypt limit, kept as
//! the one rule everywhere), and hard to guess by zxcvbn's estimate, with its own dictionaries
//! (common passwords, English words, names) and the words of its owner (name, e-mail address,
//! project name). Pure: no I/O, so the control API, the first-run bootstrap and the tests all ask
//! the same question. The breached-password API, when configured, is a separate check that comes
//! after this one (`control::base::guards::check_not_breached`).

use zxcvbn::feedback::Warning;

/// The shortest password any policy allows (Medplum's rule).
pub const MIN_CHARS: usize = 8;

/// The longest, in bytes.
pub const MAX_BYTES: usize = 72;

/// zxcvbn's scores run from 0 (guessed in under 10^3 tries) to 4 (over 10^10).
pub const MAX_STRENGTH: u8 = 4;

/// Medplum's texts for the two length rules at the default length.
pub const TOO_SHORT: &str = "Invalid password, must be at least 8 characters";
pub const OUT_OF_RANGE: &str = "Password must be between 8 and 72 characters";

pub const PERSONAL: &str =
    "Password must not be based on your name, e-mail address or project name";
pub const COMMON: &str = "Password is too common";
pub const GUESSABLE: &str =
    "Password is too easy to guess; a longer phrase of unrelated words is stronger";

/// The operator's password rules (`password_min_length`, `password_min_strength`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PasswordPolicy {
    pub min_chars: usize,
    /// The lowest zxcvbn score accepted; 0 turns the estimate off.
    pub min_strength: u8,
}

impl Default for PasswordPolicy {
    /// At least 8 characters and a score of 3 ("safely unguessable" against an online attack,
    /// moderately against an offline one: zxcvbn's own recommendation).
    fn default() -> Self {
        PasswordPolicy {
            min_chars: MIN_CHARS,
            min_strength: 3,
        }
    }
}

/// Why a password is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Weakness {
    TooShort {
        min_chars: usize,
    },
    TooLong {
        min_chars: usize,
    },
    /// Guessable because it is built from its owner's own words.
    Personal,
    /// On (or close to) the lists of the most used passwords.
    Common,
    Guessable,
}

impl Weakness {
    /// The text a client sees: Medplum's where it has one.
    pub fn text(&self) -> String {
        match self {
            Weakness::TooShort {
                min_chars: MIN_CHARS,
            } => TOO_SHORT.to_string(),
            Weakness::TooShort { min_chars } => {
                format!("Invalid password, must be at least {min_chars} characters")
            }
            Weakness::TooLong { min_chars } => {
                format!("Password must be between {min_chars} and {MAX_BYTES} characters")
            }
            Weakness::Personal => PERSONAL.to_string(),
            Weakness::Common => COMMON.to_string(),
            Weakness::Guessable => GUESSABLE.to_string(),
        }
    }
}

/// The words a password must not be built from: its owner's.
#[derive(Debug, Clone, Default)]
pub struct PasswordContext {
    words: Vec<String>,
}

impl PasswordContext {
    pub fn new() -> Self {
        Self::default()
    }

    /// An e-mail address: the whole, its local part and each word of it, and the domain's
    /// labels but the last (`alice.smith@clinic.example` gives `alice`, `smith`, `clinic`).
    pub fn email(mut self, email: &str) -> Self {
        let email = email.trim().to_lowercase();
        if email.is_empty() {
            return self;
        }
        let (local, domain) = email.split_once('@').unwrap_or((email.as_str(), ""));
        self.push(&email);
        self.push(local);
        self.push_words(local);
        self.push_joined(local);
        let labels: Vec<&str> = domain.split('.').collect();
        if let Some((_, named)) = labels.split_last() {
            for label in named {
                self.push_words(label);
            }
        }
        self
    }

    /// A person's or project's name: the whole and each word.
    pub fn name(mut self, name: &str) -> Self {
        let name = name.trim().to_lowercase();
        self.push(&name);
        self.push_words(&name);
        self.push_joined(&name);
        self
    }

    /// `mary.seacole` and `Mary Seacole` are also `maryseacole`.
    fn push_joined(&mut self, text: &str) {
        let joined: String = text.chars().filter(|c| c.is_alphanumeric()).collect();
        self.push(&joined);
    }

    fn push_words(&mut self, text: &str) {
        for word in text.split(|c: char| !c.is_alphanumeric()) {
            self.push(word);
        }
    }

    fn push(&mut self, word: &str) {
        // Shorter pieces match inside too many strong passwords to mean anything.
        if word.chars().count() >= 3 && !self.words.iter().any(|w| w == word) {
            self.words.push(word.to_string());
        }
    }

    pub fn words(&self) -> impl Iterator<Item = &str> {
        self.words.iter().map(String::as_str)
    }
}

impl PasswordPolicy {
    /// Checks a new password; the length rules first (cheap, and Medplum's texts), then the
    /// estimate. Takes milliseconds for a long password: call it off the async threads.
    pub fn check(&self, password: &str, context: &PasswordContext) -> Result<(), Weakness> {
        if password.chars().count() < self.min_chars {
            return Err(Weakness::TooShort {
                min_chars: self.min_chars,
            });
        }
        if password.len() > MAX_BYTES {
            return Err(Weakness::TooLong {
                min_chars: self.min_chars,
            });
        }
        if self.min_strength == 0 {
            return Ok(());
        }
        let inputs: Vec<&str> = context.words().collect();
        let strong = |candidate: &str, inputs: &[&str]| {
            u8::from(zxcvbn::zxcvbn(candidate, inputs).score()) >= self.min_strength
        };
        let rest = without_words(password, context);
        let estimate = zxcvbn::zxcvbn(password, &inputs);
        if u8::from(estimate.score()) < self.min_strength {
            // Weak, and built from the owner's words, or weak only because of them: saying so
            // helps more than the estimator's general warning.
            if rest.is_some() || (!inputs.is_empty() && strong(password, &[])) {
                return Err(Weakness::Personal);
            }
            let warning = estimate.feedback().and_then(|f| f.warning());
            return Err(match warning {
                Some(
                    Warning::ThisIsATop10Password
                    | Warning::ThisIsATop100Password
                    | Warning::ThisIsACommonPassword
                    | Warning::ThisIsSimilarToACommonlyUsedPassword,
                ) => Weakness::Common,
                _ => Weakness::Guessable,
            });
        }
        // zxcvbn counts each extra piece of a password as at least 10^4 guesses, so three of the
        // owner's words with a year in between still score well. What is left without them must
        // be strong on its own.
        if let Some(rest) = rest
            && !strong(&rest, &inputs)
        {
            return Err(Weakness::Personal);
        }
        Ok(())
    }
}

/// `password`, lower-cased, with every word of `context` taken out (the longest first); `None`
/// when it holds none of them.
fn without_words(password: &str, context: &PasswordContext) -> Option<String> {
    let lower = password.to_lowercase();
    let mut words: Vec<&str> = context.words().collect();
    words.sort_by_key(|w| std::cmp::Reverse(w.len()));
    let mut rest = lower.clone();
    for word in words {
        rest = rest.replace(word, "");
    }
    (rest != lower).then_some(rest)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(password: &str, context: &PasswordContext) -> Result<(), Weakness> {
        PasswordPolicy::default().check(password, context)
    }

    #[test]
    fn length_rules_keep_medplum_texts() {
        let none = PasswordContext::new();
        assert_eq!(check("1234567", &none).unwrap_err().text(), TOO_SHORT);
        assert_eq!(
            check(&"a long passphrase ".repeat(5), &none)
                .unwrap_err()
                .text(),
            OUT_OF_RANGE
        );
        // 8 characters of three bytes each count as 8; 25 of them are 75 bytes: too long.
        let long_policy = PasswordPolicy {
            min_chars: 12,
            min_strength: 0,
        };
        assert_eq!(long_policy.check(&"€".repeat(12), &none), Ok(()));
        assert_eq!(
            long_policy
                .check(&"€".repeat(25), &none)
                .unwrap_err()
                .text(),
            "Password must be between 12 and 72 characters"
        );
        assert_eq!(
            long_policy.check("elevenchars", &none).unwrap_err().text(),
            "Invalid password, must be at least 12 characters"
        );
    }

    #[test]
    fn common_and_guessable_passwords_are_refused() {
        let none = PasswordContext::new();
        for common in ["password123", "iloveyou1", "qwertyuiop", "Password1"] {
            assert_eq!(check(common, &none), Err(Weakness::Common), "{common}");
        }
        for guessable in ["aaaaaaaaaaaa", "abcdefgh12", "zxcvbnm,./"] {
            let got = check(guessable, &none);
            assert!(
                matches!(got, Err(Weakness::Guessable | Weakness::Common)),
                "{guessable}: {got:?}"
            );
        }
        for strong in [
            "a long practitioner password",
            "correct horse battery",
            "sea-cole-1854",
            "tW9#qL2!vR7p",
        ] {
            assert_eq!(check(strong, &none), Ok(()), "{strong}");
        }
    }

    #[test]
    fn the_owners_own_words_do_not_count() {
        let mary = PasswordContext::new()
            .email("mary.seacole@st-thomas.example")
            .name("Mary")
            .name("Seacole")
            .name("Crimean Relief");
        let words: Vec<&str> = mary.words().collect();
        for w in [
            "mary.seacole@st-thomas.example",
            "mary",
            "seacole",
            "st",
            "thomas",
        ] {
            if w.len() >= 3 {
                assert!(words.contains(&w), "{w} in {words:?}");
            }
        }
        assert!(
            !words.contains(&"example"),
            "the top-level label is not a word of hers"
        );
        for personal in [
            "maryseacole1",
            "Seacole1805!",
            "CrimeanRelief2024",
            "thomas-seacole",
        ] {
            assert_eq!(
                check(personal, &mary),
                Err(Weakness::Personal),
                "{personal}"
            );
            assert_eq!(
                check(personal, &PasswordContext::new()),
                Ok(()),
                "{personal} is strong for anyone else"
            );
        }
        assert_eq!(check("harbour kettle violin", &mary), Ok(()));
    }

    #[test]
    fn strength_zero_keeps_only_the_length_rules() {
        let off = PasswordPolicy {
            min_chars: 8,
            min_strength: 0,
        };
        assert_eq!(off.check("password", &PasswordContext::new()), Ok(()));
        assert_eq!(
            off.check("passwor", &PasswordContext::new()),
            Err(Weakness::TooShort { min_chars: 8 })
        );
    }
}
