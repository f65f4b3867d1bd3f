//! What the PostgreSQL server's own settings mean for Traitline, said once
//! at start-up: its defaults suit a small shared server, and a few settings
//! would break the promise that every output is published once.

use sqlx::Row;

use super::{Store, StoreError};

/// A sentence about one of the database server's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Advice {
    /// The setting puts the store's data or exactly-once outputs at risk
    /// (else it only makes Traitline slower than it could be).
    pub risk: bool,
    pub text: String,
}

/// Below these Traitline's writes are held back (docs/operations.md,
/// "PostgreSQL settings", which asks for a quarter of the memory and 16 GB).
const SHARED_BUFFERS_ADVISED: u64 = 1 << 30;
const MAX_WAL_SIZE_ADVISED: u64 = 4 << 30;

const SETTINGS: [&str; 5] = [
    "shared_buffers",
    "max_wal_size",
    "synchronous_commit",
    "fsync",
    "full_page_writes",
];

impl Store {
    /// What PostgreSQL's settings mean for Traitline; nothing for SQLite,
    /// whose settings Traitline makes itself.
    pub async fn database_advice(&self) -> Result<Vec<Advice>, StoreError> {
        let Some(pg) = &self.pg else {
            return Ok(Vec::new());
        };
        let rows = sqlx::query(
            "SELECT name, setting, unit FROM pg_settings WHERE name = ANY($1) ORDER BY name",
        )
        .bind(SETTINGS)
        .fetch_all(pg)
        .await?;
        let settings = rows
            .iter()
            .map(|row| Ok((row.try_get(0)?, row.try_get(1)?, row.try_get(2)?)))
            .collect::<Result<Vec<(String, String, Option<String>)>, sqlx::Error>>()?;
        Ok(advice(&settings))
    }
}

/// The advice for `settings` (name, value, unit, as `pg_settings` has them).
fn advice(settings: &[(String, String, Option<String>)]) -> Vec<Advice> {
    let mut advice = Vec::new();
    for (name, value, unit) in settings {
        let size = bytes(value, unit.as_deref());
        match (name.as_str(), value.as_str(), size) {
            ("shared_buffers", _, Some(size)) if size < SHARED_BUFFERS_ADVISED => {
                advice.push(Advice {
                    risk: false,
                    text: format!(
                        "PostgreSQL has {} of shared_buffers, sized for a small shared server: \
                         give it a quarter of the server's memory and Traitline's batches commit \
                         faster (docs/operations.md, \"PostgreSQL settings\")",
                        human(size)
                    ),
                });
            }
            ("max_wal_size", _, Some(size)) if size < MAX_WAL_SIZE_ADVISED => {
                advice.push(Advice {
                    risk: false,
                    text: format!(
                        "PostgreSQL checkpoints after {} of WAL (max_wal_size), which Traitline \
                         writes in seconds under load, and after each checkpoint writes every \
                         page it touches again whole: set max_wal_size = 16GB and \
                         checkpoint_timeout = 30min (docs/operations.md, \"PostgreSQL settings\")",
                        human(size)
                    ),
                });
            }
            ("synchronous_commit", "off", _) => advice.push(Advice {
                risk: true,
                text: "PostgreSQL has synchronous_commit off: if the database server crashes, \
                       the batches it had not yet written to disk are processed again, and the \
                       windows, alerts and profile changes already published from them are \
                       published twice; set it on"
                    .to_owned(),
            }),
            ("fsync" | "full_page_writes", "off", _) => advice.push(Advice {
                risk: true,
                text: format!(
                    "PostgreSQL has {name} off: a crash of the database server can leave the \
                     store corrupt; set it on"
                ),
            }),
            _ => {}
        }
    }
    advice
}

/// A memory setting in bytes: `value` counts `unit`s (`8kB`, `MB`, ...).
fn bytes(value: &str, unit: Option<&str>) -> Option<u64> {
    let unit = unit?;
    let digits = unit.trim_end_matches(char::is_alphabetic);
    let scale = match &unit[digits.len()..] {
        "B" => 1,
        "kB" => 1 << 10,
        "MB" => 1 << 20,
        "GB" => 1 << 30,
        "TB" => 1 << 40,
        _ => return None,
    };
    let count: u64 = if digits.is_empty() {
        1
    } else {
        digits.parse().ok()?
    };
    value.parse::<u64>().ok()?.checked_mul(count * scale)
}

/// `size` as a person writes it: whole gigabytes, else megabytes.
fn human(size: u64) -> String {
    if size >= 1 << 30 && size.is_multiple_of(1 << 30) {
        format!("{} GB", size >> 30)
    } else {
        format!("{} MB", size >> 20)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setting(name: &str, value: &str, unit: Option<&str>) -> (String, String, Option<String>) {
        (name.into(), value.into(), unit.map(Into::into))
    }

    #[test]
    fn memory_settings_are_read_in_their_units() {
        assert_eq!(bytes("16384", Some("8kB")), Some(128 << 20));
        assert_eq!(bytes("1024", Some("MB")), Some(1 << 30));
        assert_eq!(bytes("4096", Some("kB")), Some(4 << 20));
        assert_eq!(bytes("on", None), None);
        assert_eq!(bytes("12", Some("s")), None);
        assert_eq!(human(128 << 20), "128 MB");
        assert_eq!(human(16 << 30), "16 GB");
        assert_eq!(human(1536 << 20), "1536 MB");
    }

    #[test]
    fn the_small_server_defaults_are_advised_against_and_the_advised_settings_are_not() {
        let defaults = [
            setting("shared_buffers", "16384", Some("8kB")),
            setting("max_wal_size", "1024", Some("MB")),
            setting("synchronous_commit", "on", None),
            setting("fsync", "on", None),
            setting("full_page_writes", "on", None),
        ];
        let said = advice(&defaults);
        assert_eq!(said.len(), 2, "{said:?}");
        assert!(said.iter().all(|a| !a.risk));
        assert!(
            said[0].text.contains("128 MB of shared_buffers"),
            "{}",
            said[0].text
        );
        assert!(
            said[1].text.contains("after 1 GB of WAL"),
            "{}",
            said[1].text
        );

        let advised = [
            setting("shared_buffers", "524288", Some("8kB")),
            setting("max_wal_size", "16384", Some("MB")),
            setting("synchronous_commit", "local", None),
        ];
        assert_eq!(advice(&advised), Vec::new());
    }

    #[test]
    fn settings_that_risk_the_data_or_double_outputs_are_risks() {
        let risky = [
            setting("synchronous_commit", "off", None),
            setting("fsync", "off", None),
            setting("full_page_writes", "off", None),
        ];
        let said = advice(&risky);
        assert_eq!(said.len(), 3);
        assert!(said.iter().all(|a| a.risk));
        assert!(said[0].text.contains("published twice"));
        assert!(said[1].text.contains("fsync off"));
        assert!(said[2].text.contains("full_page_writes off"));
    }
}
