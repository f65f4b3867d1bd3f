use std::collections::BTreeMap;

use proptest::prelude::*;

use super::*;

fn position(n: i64) -> Position {
    Position {
        partition: (n % 8) as i32,
        offset: n * 3 - 1,
        received: 1_765_000_000_000 + n * 17 - (n % 5) * 1000,
    }
}

/// Builds a run of `claims` (sorted by the map) and keeps its blocks.
fn build(claims: &BTreeMap<String, Position>) -> (RunSummary, Vec<Vec<u8>>) {
    let mut builder = RunBuilder::new(claims.len());
    for (id, position) in claims {
        builder.push(id, *position).unwrap();
    }
    builder.finish()
}

/// What the run says of `id`: its position, or none.
fn look_up(run: &(RunSummary, Vec<Vec<u8>>), id: &str) -> Option<Position> {
    let block = run.0.block_for(id, id_hash(id))?;
    BlockCursor::find(&run.1[block], id).unwrap()
}

fn uuid(n: u64) -> String {
    let a = n.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0x5555;
    let b = a.rotate_left(17).wrapping_mul(0xff51_afd7_ed55_8ccd);
    format!(
        "{:08x}-{:04x}-4{:03x}-a{:03x}-{:012x}",
        a >> 32,
        (a >> 16) & 0xffff,
        a & 0xfff,
        b >> 52,
        b & 0xffff_ffff_ffff
    )
}

#[test]
fn every_claim_is_found_in_its_block_with_its_position() {
    let claims: BTreeMap<String, Position> = (0..20_000)
        .map(|n| {
            let id = match n % 3 {
                0 => uuid(n as u64),
                1 => format!("bench-{n}"),
                _ => format!("ajs-é-{n}-ü"),
            };
            (id, position(n))
        })
        .collect();
    let run = build(&claims);
    assert!(run.1.len() > 50, "the claims span many blocks");
    assert_eq!(run.0.claims, claims.len() as u64);
    assert_eq!(run.0.firsts.len(), run.1.len());
    for (id, position) in &claims {
        assert_eq!(look_up(&run, id), Some(*position), "{id}");
    }
    for n in 0..20_000 {
        for absent in [uuid(1_000_000 + n), format!("bench-{n}x"), format!("{n}")] {
            assert_eq!(look_up(&run, &absent), None, "{absent}");
        }
    }
    let received = claims.values().map(|p| p.received);
    assert_eq!(run.0.newest_received, received.clone().max().unwrap());
    assert_eq!(run.0.oldest_received, received.min().unwrap());
}

#[test]
fn the_filter_says_maybe_for_few_ids_it_does_not_hold() {
    let mut filter = Filter::for_ids(100_000);
    for n in 0..100_000 {
        filter.insert(id_hash(&uuid(n)));
    }
    for n in 0..100_000 {
        assert!(filter.may_contain(id_hash(&uuid(n))));
    }
    let maybe = (0..1_000_000)
        .filter(|n| filter.may_contain(id_hash(&format!("bench-{n}"))))
        .count();
    // About one in a thousand at 16 bits an id; five in a thousand would
    // make a backlog read a block for every two hundred ids.
    assert!(maybe < 5_000, "{maybe} of 1,000,000 absent ids said maybe");
    assert_eq!(filter.bytes(), 100_000 * FILTER_BITS_PER_ID / 8);
}

#[test]
fn the_stored_hash_does_not_change() {
    // Every stored run's filter holds these hashes: a change here needs a
    // migration that rebuilds the filters.
    assert_eq!(id_hash(""), 0);
    assert_eq!(id_hash("bench-1"), 0xd8a3_635e_e79b_a64d);
    assert_eq!(
        id_hash("a6f1c2d4-5e3b-4f7a-9c1d-2b8e0f6a7d35"),
        0x4632_f8ee_cb36_c5e9
    );
}

#[test]
fn claims_out_of_order_are_refused() {
    let mut builder = RunBuilder::new(2);
    builder.push("b", position(1)).unwrap();
    assert_eq!(
        builder.push("a", position(2)),
        Err(OutOfOrder("a".to_owned()))
    );
    assert_eq!(
        builder.push("b", position(2)),
        Err(OutOfOrder("b".to_owned()))
    );
    builder.push("c", position(3)).unwrap();
    assert_eq!(builder.finish().0.claims, 2);
}

#[test]
fn a_summary_survives_its_bytes() {
    let claims = (0..5_000).map(|n| (uuid(n), position(n as i64))).collect();
    let (summary, _) = build(&claims);
    let filter = Filter::from_bytes(&summary.filter.to_bytes()).unwrap();
    assert_eq!(filter, summary.filter);
    let firsts = RunSummary::firsts_from_bytes(&summary.firsts_bytes()).unwrap();
    assert_eq!(firsts, summary.firsts);
    assert!(Filter::from_bytes(&[0; 31]).is_err());
    assert!(Filter::from_bytes(&[]).is_err());
    assert!(RunSummary::firsts_from_bytes(&[5, b'a']).is_err());
}

#[test]
fn a_merge_keeps_each_id_once_at_its_oldest_position_and_drops_what_expired() {
    let older: BTreeMap<String, Position> = (0..3_000)
        .map(|n| (format!("id-{n:05}"), position(n)))
        .collect();
    let newer: BTreeMap<String, Position> = (2_000..6_000)
        .map(|n| (format!("id-{n:05}"), position(n + 100_000)))
        .collect();
    let cutoff = position(500).received;
    let runs = [build(&older), build(&newer)];
    let mut out = RunBuilder::new(6_000);
    let sources = runs.iter().map(|run| {
        let mut blocks = run.1.iter();
        let mut claims = Vec::new().into_iter();
        move || -> Result<Option<OwnedClaim>, OutOfOrder> {
            loop {
                if let Some(claim) = claims.next() {
                    return Ok(Some(claim));
                }
                let Some(block) = blocks.next() else {
                    return Ok(None);
                };
                let mut cursor = BlockCursor::new(block);
                let mut read = Vec::new();
                while let Some((id, position)) = cursor.next_claim().unwrap() {
                    read.push(OwnedClaim {
                        id: id.to_owned(),
                        position,
                    });
                }
                claims = read.into_iter();
            }
        }
    });
    let taken = std::cell::RefCell::new(Vec::new());
    merge(
        sources.collect(),
        |p| p.received >= cutoff,
        |id, position| {
            out.push(id, position)?;
            taken.borrow_mut().extend(out.take_blocks());
            Ok::<_, OutOfOrder>(())
        },
    )
    .unwrap();
    let (summary, rest) = out.finish();
    let mut blocks = taken.into_inner();
    assert!(blocks.len() > 1, "blocks are taken as they close");
    blocks.extend(rest);
    let merged = (summary, blocks);
    let mut want = newer.clone();
    want.extend(older.clone());
    want.retain(|_, p| p.received >= cutoff);
    assert_eq!(merged.0.claims, want.len() as u64);
    for (id, position) in &want {
        assert_eq!(look_up(&merged, id), Some(*position), "{id}");
    }
    assert_eq!(look_up(&merged, "id-00000"), None, "expired");
    assert_eq!(
        look_up(&merged, "id-02500"),
        older.get("id-02500").copied(),
        "the older run's position"
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn a_run_answers_as_the_claims_it_was_built_from(
        claims in proptest::collection::btree_map(
            "[a-c]{0,3}[é0-9-]{0,12}",
            (any::<i32>(), any::<i64>(), any::<i64>()),
            0..400,
        ),
        others in proptest::collection::vec("[a-c]{0,3}[é0-9-]{0,12}", 0..100),
    ) {
        let claims: BTreeMap<String, Position> = claims
            .into_iter()
            .map(|(id, (partition, offset, received))| {
                (id, Position { partition, offset, received })
            })
            .collect();
        let run = build(&claims);
        for (id, position) in &claims {
            prop_assert_eq!(look_up(&run, id), Some(*position));
        }
        for id in &others {
            prop_assert_eq!(look_up(&run, id), claims.get(id).copied());
        }
        let mut read = BTreeMap::new();
        for block in &run.1 {
            let mut cursor = BlockCursor::new(block);
            while let Some((id, position)) = cursor.next_claim().unwrap() {
                read.insert(id.to_owned(), position);
            }
        }
        prop_assert_eq!(read, claims);
    }

    #[test]
    fn a_damaged_block_is_an_error_never_a_panic(
        bytes in proptest::collection::vec(any::<u8>(), 0..200),
    ) {
        let mut cursor = BlockCursor::new(&bytes);
        for _ in 0..200 {
            match cursor.next_claim() {
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => break,
            }
        }
        let _ = RunSummary::firsts_from_bytes(&bytes);
        let _ = Filter::from_bytes(&bytes);
    }
}
