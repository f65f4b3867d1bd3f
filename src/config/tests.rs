use super::*;

#[test]
fn defaults_are_embedded_on_localhost_8080() {
    let c = Config::from_settings(Settings::default()).unwrap();
    assert_eq!(c.listen.to_string(), "127.0.0.1:8080");
    assert_eq!(c.data_dir, PathBuf::from("./traitline-data"));
    assert!(matches!(c.log, LogBackend::Embedded));
    assert_eq!(c.partitions, 8);
    assert_eq!(c.limits.max_event_bytes, 32 * 1024);
    assert_eq!(c.limits.max_batch_bytes, 500 * 1024);
    assert_eq!(c.append_timeout, Duration::from_secs(5));
    assert_eq!(c.clock_skew, Duration::from_secs(2));
    assert_eq!((c.process_batch, c.profile_cache), (40_000, 20_000));
    let off: Settings = toml::from_str("profile-cache = 0").unwrap();
    assert_eq!(Config::from_settings(off).unwrap().profile_cache, 0);
}

#[test]
fn flags_and_environment_win_over_the_file() {
    let cli = Settings {
        partitions: Some(3),
        ..Settings::default()
    };
    let file: Settings = toml::from_str("partitions = 12\nlisten = \"0.0.0.0:9000\"").unwrap();
    let c = Config::from_settings(cli.or(file)).unwrap();
    assert_eq!(c.partitions, 3);
    assert_eq!(c.listen.to_string(), "0.0.0.0:9000");
}

#[test]
fn a_bad_setting_names_itself() {
    let err = Config::from_settings(Settings {
        listen: Some("localhost".into()),
        ..Settings::default()
    })
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("`listen`") && err.contains("TRAITLINE_LISTEN"),
        "{err}"
    );

    let err = Config::from_settings(Settings {
        roles: Some(vec!["ingest".into(), "dashboard".into()]),
        ..Settings::default()
    })
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("`roles`") && err.contains("dashboard"),
        "{err}"
    );

    let err = Config::from_settings(Settings {
        kafka_brokers: Some("localhost:9092".into()),
        kafka_compression: Some("brotli".into()),
        ..Settings::default()
    })
    .unwrap_err()
    .to_string();
    assert!(err.contains("TRAITLINE_KAFKA_COMPRESSION"), "{err}");

    let err = Config::from_settings(Settings {
        profile_cache: Some(20_000_000),
        ..Settings::default()
    })
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("`profile-cache`") && err.contains("TRAITLINE_PROFILE_CACHE"),
        "{err}"
    );

    let err = Config::from_settings(Settings {
        metric_state_budget_mb: Some(0),
        ..Settings::default()
    })
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("`metric-state-budget-mb`")
            && err.contains("TRAITLINE_METRIC_STATE_BUDGET_MB"),
        "{err}"
    );
    let budget = |mb| {
        Config::from_settings(Settings {
            metric_state_budget_mb: mb,
            ..Settings::default()
        })
        .unwrap()
        .metric_state_budget
    };
    assert_eq!((budget(None), budget(Some(3))), (256 << 20, 3 << 20));

    // Deduplication follows the events' retention; the old setting
    // is refused rather than silently ignored.
    let err = Config::from_settings(Settings {
        dedup_window_hours: Some(72),
        ..Settings::default()
    })
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("`dedup-window-hours`")
            && err.contains("TRAITLINE_DEDUP_WINDOW_HOURS")
            && err.contains("events-retention-days"),
        "{err}"
    );
}

#[test]
fn otlp_export_is_off_by_default_and_a_base_url_gets_the_traces_path() {
    assert_eq!(
        Config::from_settings(Settings::default()).unwrap().otlp,
        None
    );
    let on = |endpoint: &str| {
        Config::from_settings(Settings {
            otlp_endpoint: Some(endpoint.into()),
            ..Settings::default()
        })
        .map(|c| c.otlp.unwrap().traces_url)
    };
    assert_eq!(
        on("http://collector:4318").unwrap(),
        "http://collector:4318/v1/traces"
    );
    assert_eq!(
        on("http://collector:4318/").unwrap(),
        "http://collector:4318/v1/traces"
    );
    assert_eq!(
        on("https://c.example/otlp/v1/traces").unwrap(),
        "https://c.example/otlp/v1/traces"
    );
    let err = on("collector:4318").unwrap_err().to_string();
    assert!(err.contains("TRAITLINE_OTLP_ENDPOINT"), "{err}");
    let err = Config::from_settings(Settings {
        otlp_sample_ratio: Some(1.5),
        ..Settings::default()
    })
    .unwrap_err()
    .to_string();
    assert!(err.contains("TRAITLINE_OTLP_SAMPLE_RATIO"), "{err}");
}

#[test]
fn the_rate_limit_is_off_by_default_and_its_burst_defaults_to_one_second() {
    let off = Config::from_settings(Settings::default()).unwrap();
    assert_eq!(off.limits.rate_limit, None);
    let file: Settings = toml::from_str("rate-limit-events = 100").unwrap();
    let on = Config::from_settings(file)
        .unwrap()
        .limits
        .rate_limit
        .unwrap();
    assert_eq!((on.per_second.get(), on.burst.get()), (100, 100));
    let err = Config::from_settings(Settings {
        rate_limit_events: Some(100),
        rate_limit_burst: Some(0),
        ..Settings::default()
    })
    .unwrap_err()
    .to_string();
    assert!(err.contains("rate-limit-burst"), "{err}");
}

#[test]
fn kafka_security_settings_become_librdkafka_options_and_secrets_stay_hidden() {
    let settings = Settings {
        kafka_brokers: Some("k:9092".into()),
        kafka_security_protocol: Some("SASL_SSL".into()),
        kafka_sasl_mechanism: Some("SCRAM-SHA-512".into()),
        kafka_sasl_username: Some("svc".into()),
        kafka_sasl_password: Some("hunter2-secret".into()),
        kafka_options: Some(vec!["sasl.username=override".into()]),
        ..Settings::default()
    };
    let LogBackend::Kafka(kafka) = Config::from_settings(settings).unwrap().log else {
        panic!("Kafka mode");
    };
    let value = |name: &str| {
        // The last one wins in librdkafka: a kafka-option overrides.
        kafka
            .options
            .iter()
            .rev()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    };
    assert_eq!(value("security.protocol"), Some("SASL_SSL"));
    assert_eq!(value("sasl.mechanisms"), Some("SCRAM-SHA-512"));
    assert_eq!(value("sasl.password"), Some("hunter2-secret"));
    assert_eq!(value("sasl.username"), Some("override"));
    let shown = format!("{kafka:?}");
    assert!(
        !shown.contains("hunter2-secret") && shown.contains("sasl.password"),
        "{shown}"
    );

    let err = Config::from_settings(Settings {
        kafka_brokers: Some("k:9092".into()),
        kafka_security_protocol: Some("tls".into()),
        ..Settings::default()
    })
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("kafka-security-protocol") && err.contains("sasl_ssl"),
        "{err}"
    );
    let err = Config::from_settings(Settings {
        kafka_brokers: Some("k:9092".into()),
        kafka_options: Some(vec!["ssl.key.password".into()]),
        ..Settings::default()
    })
    .unwrap_err()
    .to_string();
    assert!(err.contains("kafka-option") && err.contains("***"), "{err}");
}

#[test]
fn unknown_file_keys_are_refused() {
    assert!(toml::from_str::<Settings>("listn = \"x\"").is_err());
}

#[test]
fn a_bad_metric_in_the_file_fails_at_start_naming_it_and_its_field() {
    let error = |text: &str| {
        let settings: Settings = toml::from_str(text).unwrap();
        Config::from_settings(settings).unwrap_err().to_string()
    };
    let bad_size = error(
        r#"
        [[metrics]]
        name = "orders_hourly"
        aggregate = "count"
        window = { kind = "tumbling", size = "an hour" }
        "#,
    );
    assert!(
        bad_size.contains("metrics[0]") && bad_size.contains("`window.size`"),
        "{bad_size}"
    );
    let unnamed = error(
        r#"
        [[metrics]]
        aggregate = "count"
        window = { kind = "tumbling", size = "1h" }
        "#,
    );
    assert!(unnamed.contains("`name`"), "{unnamed}");
    let twice = error(
        r#"
        [[metrics]]
        name = "a"
        group_by = "userId"
        aggregate = "count"
        window = { kind = "tumbling", size = "1h" }
        [[metrics]]
        name = "a"
        group_by = "userId"
        aggregate = "count"
        window = { kind = "tumbling", size = "2h" }
        "#,
    );
    assert!(
        twice.contains("metrics[1]") && twice.contains("twice"),
        "{twice}"
    );
}

#[test]
fn rules_in_the_file_are_read_and_a_bad_one_fails_at_start_naming_its_field() {
    let read = |text: &str| {
        let settings: Settings = toml::from_str(text).unwrap();
        Config::from_settings(settings)
    };
    let config = read(
        r#"
        [[rules]]
        name = "card_testing"
        within = "5m"
        lateness = "1m"
        steps = [
          { name = "small", where = "event == 'payment' && properties.amount < 100", times = { min = 3 } },
          { name = "large", where = "event == 'payment' && properties.amount > 1000" },
        ]
        "#,
    )
    .unwrap();
    assert_eq!(config.rules.len(), 1);
    assert_eq!(config.rules[0].0, "card_testing");
    let error = read(
        r#"
        [[rules]]
        name = "abandoned"
        within = "30m"
        steps = [
          { name = "order", where = "event == 'order.create'", not = true },
          { name = "checkout", where = "event == 'checkout.started'" },
        ]
        "#,
    )
    .unwrap_err()
    .to_string();
    assert!(
        error.contains("rules[0]") && error.contains("`steps[0].not`"),
        "{error}"
    );
}
