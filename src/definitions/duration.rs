//! Durations as definitions write them: `"500ms"`, `"10s"`, `"5m"`, `"1h"`,
//! `"30d"`, or several parts (`"1h30m"`).

use std::time::Duration;

/// Parses a duration; the error says what is wrong with it, for the
/// definition error that names the field.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let bad =
        || format!("`{text}` is not a duration like \"500ms\", \"10s\", \"5m\", \"1h\" or \"30d\"");
    let mut rest = text.trim();
    if rest.is_empty() {
        return Err(bad());
    }
    let mut total: u128 = 0;
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
        if digits == 0 {
            return Err(bad());
        }
        let number: u128 = rest[..digits].parse().map_err(|_| bad())?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let millis: u128 = match &rest[..unit_len] {
            "ms" => 1,
            "s" => 1_000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            "w" => 7 * 86_400_000,
            _ => return Err(bad()),
        };
        rest = &rest[unit_len..];
        total = total
            .checked_add(number.checked_mul(millis).ok_or_else(bad)?)
            .ok_or_else(bad)?;
    }
    // Beyond about 290 million years a window means nothing.
    if total > i64::MAX as u128 / 1_000 {
        return Err(format!("`{text}` is too long"));
    }
    Ok(Duration::from_millis(total as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_units_of_the_design_parse() {
        let ms = |t| parse_duration(t).unwrap().as_millis();
        assert_eq!(ms("500ms"), 500);
        assert_eq!(ms("10s"), 10_000);
        assert_eq!(ms("5m"), 300_000);
        assert_eq!(ms("1h"), 3_600_000);
        assert_eq!(ms("30d"), 2_592_000_000);
        assert_eq!(ms("1h30m"), 5_400_000);
        assert_eq!(ms("0s"), 0);
    }

    #[test]
    fn anything_else_is_refused_with_the_text() {
        for bad in [
            "",
            "5",
            "m",
            "5 m",
            "-5m",
            "1.5h",
            "5y",
            "99999999999999999999d",
        ] {
            let error = parse_duration(bad).unwrap_err();
            assert!(error.contains(&format!("`{bad}`")), "{error}");
        }
    }
}
