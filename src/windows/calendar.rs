//! Calendar windows: a day, week or month of local time in a time zone,
//! as instants. A day is 23 or 25 hours long when the clocks change.

use chrono::{Datelike, Days, LocalResult, Months, NaiveDate, NaiveTime, TimeZone};
use chrono_tz::Tz;
use serde::{Deserialize, Serialize};

use super::{Millis, Span};

/// The length of a calendar window.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CalendarUnit {
    Day,
    /// From Monday, as ISO 8601 weeks.
    Week,
    Month,
}

/// The calendar window of `unit` in `zone` that holds instant `at`.
pub fn calendar_span(at: Millis, unit: CalendarUnit, zone: Tz) -> Span {
    let local = zone.timestamp_millis_opt(at).single().map_or_else(
        // Out of chrono's range: a day-long window in UTC terms.
        || chrono::DateTime::UNIX_EPOCH.date_naive(),
        |t| t.date_naive(),
    );
    let first = match unit {
        CalendarUnit::Day => local,
        CalendarUnit::Week => local - Days::new(u64::from(local.weekday().num_days_from_monday())),
        CalendarUnit::Month => local.with_day(1).unwrap_or(local),
    };
    let next = match unit {
        CalendarUnit::Day => first + Days::new(1),
        CalendarUnit::Week => first + Days::new(7),
        CalendarUnit::Month => first + Months::new(1),
    };
    Span {
        start: day_start(first, zone),
        end: day_start(next, zone),
    }
}

/// The first instant of local `day` in `zone`: midnight, or, where the
/// clocks skip midnight, the first local time that exists after it.
fn day_start(day: NaiveDate, zone: Tz) -> Millis {
    let mut time = day.and_time(NaiveTime::MIN);
    for _ in 0..48 {
        match zone.from_local_datetime(&time) {
            LocalResult::Single(t) => return t.timestamp_millis(),
            // Clocks set back over midnight: the day starts at the first.
            LocalResult::Ambiguous(first, _) => return first.timestamp_millis(),
            LocalResult::None => time += chrono::Duration::minutes(30),
        }
    }
    day.and_time(NaiveTime::MIN).and_utc().timestamp_millis()
}

#[cfg(test)]
mod tests {
    use chrono::{DateTime, Utc};

    use super::*;

    fn ms(text: &str) -> Millis {
        DateTime::parse_from_rfc3339(text)
            .unwrap()
            .timestamp_millis()
    }

    fn text(at: Millis) -> String {
        DateTime::<Utc>::from_timestamp_millis(at)
            .unwrap()
            .to_rfc3339()
    }

    #[test]
    fn a_spring_forward_day_is_23_hours_and_a_fall_back_day_25() {
        let berlin: Tz = "Europe/Berlin".parse().unwrap();
        // 2026-03-29: clocks go from 02:00 to 03:00 in Berlin.
        let spring = calendar_span(ms("2026-03-29T12:00:00+02:00"), CalendarUnit::Day, berlin);
        assert_eq!(text(spring.start), "2026-03-28T23:00:00+00:00");
        assert_eq!(text(spring.end), "2026-03-29T22:00:00+00:00");
        assert_eq!(spring.end - spring.start, 23 * 3_600_000);
        // 2026-10-25: clocks go from 03:00 back to 02:00.
        let fall = calendar_span(ms("2026-10-25T01:30:00+00:00"), CalendarUnit::Day, berlin);
        assert_eq!(fall.end - fall.start, 25 * 3_600_000);
        // The instants around the change belong to the right days.
        let before = calendar_span(ms("2026-03-28T22:59:59.999Z"), CalendarUnit::Day, berlin);
        assert_eq!(before.end, spring.start);
    }

    #[test]
    fn weeks_start_on_monday_and_months_on_the_first() {
        let utc: Tz = "UTC".parse().unwrap();
        // 2026-12-02 is a Wednesday.
        let week = calendar_span(ms("2026-12-02T10:00:00Z"), CalendarUnit::Week, utc);
        assert_eq!(text(week.start), "2026-11-30T00:00:00+00:00");
        assert_eq!(text(week.end), "2026-12-07T00:00:00+00:00");
        let month = calendar_span(ms("2026-02-15T10:00:00Z"), CalendarUnit::Month, utc);
        assert_eq!(text(month.start), "2026-02-01T00:00:00+00:00");
        assert_eq!(text(month.end), "2026-03-01T00:00:00+00:00");
    }

    #[test]
    fn a_zone_that_skips_midnight_starts_its_day_when_the_clock_resumes() {
        // Santiago, 2026-09-06: clocks jump from 00:00 to 01:00.
        let santiago: Tz = "America/Santiago".parse().unwrap();
        let day = calendar_span(ms("2026-09-06T12:00:00-03:00"), CalendarUnit::Day, santiago);
        assert_eq!(text(day.start), "2026-09-06T04:00:00+00:00");
        assert_eq!(day.end - day.start, 23 * 3_600_000);
    }
}
