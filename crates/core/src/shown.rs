//! Names that keycast shows to people other than whoever chose them: an app's `client_id`
//! and `nostrconnect://` name on the consent, approval and dashboard pages, a registered
//! app's name, a policy's name, an account's address.

/// Whether `c` hides or reorders the text around it instead of showing itself: a control
/// character or a line or paragraph separator; one of Unicode's format characters that steer
/// direction (embeddings, overrides, isolates, marks); one that splits or pads words without a
/// glyph (zero-width space, word joiner, soft hyphen, combining grapheme joiner, the Hangul
/// and Khmer fillers); or one that tags text unseen (byte-order mark, tag characters). A name
/// holding one can read as another name ("Da\u{200b}mus"), or turn the page's own words after
/// it back to front (a right-to-left override). The zero-width non-joiner and joiner
/// (U+200C, U+200D) and the variation selectors pass: Persian spelling, Indic scripts and
/// emoji sequences need them.
pub fn disguises(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{00AD}'
                | '\u{034F}'
                | '\u{061C}'
                | '\u{115F}'
                | '\u{1160}'
                | '\u{17B4}'
                | '\u{17B5}'
                | '\u{180E}'
                | '\u{200B}'
                | '\u{200E}'
                | '\u{200F}'
                | '\u{2028}'..='\u{202E}'
                | '\u{2060}'..='\u{2064}'
                | '\u{2066}'..='\u{206F}'
                | '\u{3164}'
                | '\u{FEFF}'
                | '\u{FFA0}'
                | '\u{FFF9}'..='\u{FFFB}'
                | '\u{E0001}'
                | '\u{E0020}'..='\u{E007F}'
        )
}

/// Whether `name` holds a character that [`disguises`] it, or a zero-width non-joiner or
/// joiner (U+200C, U+200D) next to an ASCII character or at either end: the scripts and emoji
/// that need them never put them there, and there they only make a name look like another
/// ("Da\u{200d}mus", or an `app_…` id that is not one).
pub fn disguised(name: &str) -> bool {
    let chars: Vec<char> = name.chars().collect();
    chars.iter().enumerate().any(|(i, &c)| {
        disguises(c)
            || (matches!(c, '\u{200C}' | '\u{200D}') && {
                let before = i.checked_sub(1).and_then(|j| chars.get(j));
                let after = chars.get(i + 1);
                [before, after].iter().any(|n| n.is_none_or(char::is_ascii))
            })
    })
}

/// What a refusal says of a name holding such a character.
pub const REFUSED: &str =
    "may not hold control characters or invisible formatting characters (such as a right-to-left override or a zero-width space)";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_disguises_a_name_and_what_does_not() {
        let hidden = "\0\n\u{202E}\u{2066}\u{200B}\u{200F}\u{FEFF}\u{E0041}\u{034F}\u{3164}\u{2028}";
        for c in hidden.chars() {
            assert!(disguises(c), "{c:?}");
        }
        for c in "aÜéש中🙂 -".chars() {
            assert!(!disguises(c), "{c:?}");
        }
        // Persian spelling (a zero-width non-joiner) and emoji sequences (a joiner, a
        // variation selector) are names people give; the same joiners beside ASCII only make
        // a name look like another.
        for name in ["می\u{200C}خواهم", "👩\u{200D}💻", "🏳\u{FE0F}\u{200D}🌈", "Über App"] {
            assert!(!disguised(name), "{name}");
        }
        for name in [
            "Da\u{200D}mus",
            "app_\u{200C}0123",
            "\u{200D}👩",
            "Da\u{200B}mus",
            "x\u{202E}",
        ] {
            assert!(disguised(name), "{name}");
        }
    }
}
