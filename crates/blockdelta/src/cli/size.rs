//! Sizes on the command line as `qemu-img` reads them (`64k`, `1M`, `0.5k`, `0x1000`).

/// Why a size was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SizeError {
    /// Not a size at all (bad digits, unknown or trailing suffix, a fraction of bytes).
    Invalid,
    /// Negative, or above `i64::MAX`.
    Range,
}

impl SizeError {
    /// `qemu-img`'s message for this error about the size `what`, given as `text`.
    pub fn message(self, what: &str, text: &str) -> String {
        match self {
            SizeError::Invalid => format!("Invalid {what} specified: '{text}'."),
            SizeError::Range => {
                format!("Invalid {what} specified. Must be between 0 and {}.", i64::MAX)
            }
        }
    }
}

/// The multiplier of a unit suffix (binary units, either case).
fn unit(suffix: char) -> Option<u64> {
    let shift = match suffix.to_ascii_lowercase() {
        'b' => 0,
        'k' => 10,
        'm' => 20,
        'g' => 30,
        't' => 40,
        'p' => 50,
        'e' => 60,
        _ => return None,
    };
    Some(1 << shift)
}

/// Parses a size as `qemu-img` does for its size options: leading white space, an
/// optional `+`, a decimal number (whose fraction may not leave a part of a byte without
/// a unit; with one, the bytes are truncated) or a `0x` hexadecimal integer, then at most
/// one unit letter (`b k m g t p e`, either case) and nothing else. The result is at most
/// `i64::MAX`.
pub fn parse_size(text: &str) -> Result<u64, SizeError> {
    let s = text.trim_start_matches([' ', '\t', '\n', '\x0b', '\x0c', '\r']);
    if s.starts_with('-') {
        return Err(SizeError::Range);
    }
    let s = s.strip_prefix('+').unwrap_or(s);
    if let Some(hex) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        // Hexadecimal takes neither a fraction nor a unit.
        if hex.is_empty() || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(SizeError::Invalid);
        }
        let digits = hex.trim_start_matches('0');
        if digits.len() > 16 {
            return Err(SizeError::Range);
        }
        let value = u64::from_str_radix(if digits.is_empty() { "0" } else { digits }, 16)
            .map_err(|_| SizeError::Invalid)?;
        return if value > i64::MAX as u64 { Err(SizeError::Range) } else { Ok(value) };
    }
    let int_len = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (int_part, rest) = s.split_at(int_len);
    let (frac_part, rest) = match rest.strip_prefix('.') {
        Some(after) => {
            let len = after.find(|c: char| !c.is_ascii_digit()).unwrap_or(after.len());
            (Some(&after[..len]), &after[len..])
        }
        None => (None, rest),
    };
    if int_part.is_empty() && frac_part.is_none_or(str::is_empty) {
        return Err(SizeError::Invalid);
    }
    let mut chars = rest.chars();
    let multiplier = match chars.next() {
        None => 1,
        Some(c) => unit(c).ok_or(SizeError::Invalid)?,
    };
    if chars.next().is_some() {
        return Err(SizeError::Invalid);
    }
    // A fraction of a byte is refused; `4096.0` is fine.
    if multiplier == 1 && frac_part.is_some_and(|d| d.bytes().any(|b| b != b'0')) {
        return Err(SizeError::Invalid);
    }
    let int: u64 =
        if int_part.is_empty() { 0 } else { int_part.parse().map_err(|_| SizeError::Range)? };
    let whole = int.checked_mul(multiplier).ok_or(SizeError::Range)?;
    let fraction = match frac_part {
        Some(digits) if !digits.is_empty() => {
            let f: f64 = format!("0.{digits}").parse().map_err(|_| SizeError::Invalid)?;
            // Truncated, as QEMU does: 0.3k is 307 bytes.
            (f * multiplier as f64) as u64
        }
        _ => 0,
    };
    let value = whole.checked_add(fraction).ok_or(SizeError::Range)?;
    if value > i64::MAX as u64 { Err(SizeError::Range) } else { Ok(value) }
}

#[cfg(test)]
mod tests {
    use super::{SizeError, parse_size};

    /// Each answer is what `qemu-img bitmap --add -g TEXT` (QEMU 10.0.2) made of TEXT.
    #[test]
    fn sizes_parse_like_qemu_img() {
        let ok = [
            ("0x1000", 4096),
            ("512b", 512),
            ("512B", 512),
            (" 64k", 65536),
            ("\t4k", 4096),
            ("0.5k", 512),
            (".5k", 512),
            ("0.3k", 307),
            ("1.0000000001k", 1024),
            ("1.25k", 1280),
            ("1.5k", 1536),
            ("4096.0", 4096),
            ("+4096", 4096),
            ("00512", 512),
            ("0X200", 512),
            ("0", 0),
            ("0b", 0),
            ("2G", 1 << 31),
            ("1E", 1 << 60),
            ("64K", 65536),
            ("1M", 1 << 20),
        ];
        for (text, value) in ok {
            assert_eq!(parse_size(text), Ok(value), "{text:?}");
        }
        let invalid =
            ["1x", "64kB", "64KiB", "64k ", "1e3", "4k.5", "0x1.8k", "", "k", "0x", "0x200k"];
        for text in invalid {
            assert_eq!(parse_size(text), Err(SizeError::Invalid), "{text:?}");
        }
        for text in ["512.5", "512.9", "1.5"] {
            assert_eq!(parse_size(text), Err(SizeError::Invalid), "{text:?}");
        }
        for text in ["-1", "-0", "16E", "8e", "99999999999999999999"] {
            assert_eq!(parse_size(text), Err(SizeError::Range), "{text:?}");
        }
    }

    #[test]
    fn messages_are_qemu_img_s() {
        assert_eq!(
            SizeError::Invalid.message("granularity", "1x"),
            "Invalid granularity specified: '1x'."
        );
        assert_eq!(
            SizeError::Range.message("granularity", "-1"),
            "Invalid granularity specified. Must be between 0 and 9223372036854775807."
        );
    }
}
