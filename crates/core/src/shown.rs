//! Names that keycast shows to people other than whoever chose them: an app's `client_id`
//! and `nostrconnect://` name on the consent, approval and dashboard pages, a registered
//! app's name, a policy's name, an account's address.

/// Whether `c` hides or reorders the text around it instead of showing itself: a control
/// character, or one of Unicode's format characters that steer direction (embeddings,
/// overrides, isolates, marks), join or split words without a glyph (zero-width space and
/// joiners, word joiner, soft hyphen), or tag text unseen (byte-order mark, tag characters).
/// A name holding one can read as another name ("Da\u{200b}mus"), or turn the page's own
/// words after it back to front (a right-to-left override).
pub fn disguises(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{00AD}'
                | '\u{061C}'
                | '\u{180E}'
                | '\u{200B}'..='\u{200F}'
                | '\u{202A}'..='\u{202E}'
                | '\u{2060}'..='\u{2064}'
                | '\u{2066}'..='\u{206F}'
                | '\u{FEFF}'
                | '\u{FFF9}'..='\u{FFFB}'
                | '\u{E0001}'
                | '\u{E0020}'..='\u{E007F}'
        )
}

/// What a refusal says of a name holding such a character.
pub const REFUSED: &str =
    "may not hold control characters or invisible formatting characters (such as a right-to-left override or a zero-width space)";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_disguises_a_name_and_what_does_not() {
        for c in [
            '\0',
            '\n',
            '\u{202E}',
            '\u{2066}',
            '\u{200B}',
            '\u{200F}',
            '\u{FEFF}',
            '\u{E0041}',
        ] {
            assert!(disguises(c), "{c:?}");
        }
        for c in ['a', 'Ü', 'é', 'ש', '中', '🙂', ' ', '-'] {
            assert!(!disguises(c), "{c:?}");
        }
    }
}
