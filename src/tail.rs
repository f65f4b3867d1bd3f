//! `traitline events tail`: stored records as JSON lines, from either log.

use std::io::Write;
use std::time::Duration;

use base64::Engine;
use serde_json::{Value, json};

use crate::cli::TailArgs;
use crate::config::Config;
use crate::log::{self, ReadError, StartAt, StoredRecord, Topics};

/// Prints records of the chosen topic to `out` until interrupted, or, with
/// `--exit` / `--count`, until the end of the log or the count.
pub async fn run(config: &Config, args: &TailArgs, out: &mut impl Write) -> Result<(), ReadError> {
    let topic = Topics::new(&config.topic_prefix).named(&args.topic);
    let start = if args.from_beginning {
        StartAt::Beginning
    } else {
        StartAt::End
    };
    let mut reader = log::open_reader(config, &topic, start)?;
    let mut printed = 0u64;
    loop {
        let polled = reader.poll(1000, Duration::from_millis(500)).await?;
        for record in &polled.records {
            let line = render(record);
            if writeln!(out, "{line}").is_err() {
                return Ok(()); // the reader of our output went away (a closed pipe)
            }
            printed += 1;
            if args.count.is_some_and(|c| printed >= c) {
                let _ = out.flush();
                return Ok(());
            }
        }
        let _ = out.flush();
        if args.exit && polled.caught_up && polled.records.is_empty() {
            return Ok(());
        }
    }
}

/// One record as a JSON object; a JSON value stays JSON, anything else is
/// a string (UTF-8) or base64.
pub fn render(record: &StoredRecord) -> Value {
    let bytes_value = |bytes: &[u8]| match serde_json::from_slice::<Value>(bytes) {
        Ok(v) => v,
        Err(_) => match std::str::from_utf8(bytes) {
            Ok(s) => Value::String(s.to_owned()),
            Err(_) => Value::String(base64::engine::general_purpose::STANDARD.encode(bytes)),
        },
    };
    json!({
        "topic": record.topic,
        "partition": record.partition,
        "offset": record.offset,
        "timestamp": record.timestamp_ms,
        "key": record.key.as_deref().map(|k| String::from_utf8_lossy(k).into_owned()),
        "value": bytes_value(&record.value),
    })
}
