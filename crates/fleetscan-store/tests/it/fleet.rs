//! The fleet's shared state, on both backends: generation and pool identities, scan claims,
//! and (Postgres) the notifications between brokers.
//!
//! Postgres is required: without root and the Postgres binaries (or DATABASE_URL) the Postgres
//! half fails with a message saying so; it is never skipped.

use std::time::Duration;

use fleetscan_core::{ScannerIdentity, Sha256};
use fleetscan_store::{Claim, Notice, Store};

use crate::common::{Fixture, postgres_fixture, sqlite_fixture};

both_backends!(
    a_new_identity_becomes_current_and_moves_the_generation,
    an_identity_seen_before_does_not_turn_the_pool_back,
    pools_are_independent_and_scoped_to_their_tenant,
    the_generation_is_the_same_for_every_broker_of_the_store,
    a_claim_is_held_until_released_or_expired,
);

fn identity(ruleset: &str) -> ScannerIdentity {
    ScannerIdentity {
        scanner: "reference".into(),
        engine: "yara-x".into(),
        engine_version: "1.0".into(),
        ruleset_version: ruleset.into(),
    }
}

async fn a_new_identity_becomes_current_and_moves_the_generation(f: Fixture) {
    let start = f.store.fleet_state().await.unwrap();
    assert!(start.pools.is_empty());
    assert!(
        start.generation > 1_600_000_000_000,
        "a new store starts its generation at its creation time: {}",
        start.generation
    );

    let state = f
        .store
        .register_identity("t", "default", &identity("r1"), 1)
        .await
        .unwrap();
    assert_eq!(state.generation, start.generation + 1);
    assert_eq!(state.current("t", "default"), Some(&identity("r1")));

    // The same identity again (a second worker, a reconnect) changes nothing.
    let again = f
        .store
        .register_identity("t", "default", &identity("r1"), 2)
        .await
        .unwrap();
    assert_eq!(again, state);

    let upgraded = f
        .store
        .register_identity("t", "default", &identity("r2"), 3)
        .await
        .unwrap();
    assert_eq!(upgraded.generation, state.generation + 1);
    assert_eq!(upgraded.current("t", "default"), Some(&identity("r2")));
}

async fn an_identity_seen_before_does_not_turn_the_pool_back(f: Fixture) {
    f.store
        .register_identity("t", "default", &identity("r1"), 1)
        .await
        .unwrap();
    let upgraded = f
        .store
        .register_identity("t", "default", &identity("r2"), 2)
        .await
        .unwrap();
    // An old worker reconnecting during a rolling upgrade.
    let after = f
        .store
        .register_identity("t", "default", &identity("r1"), 3)
        .await
        .unwrap();
    assert_eq!(after, upgraded);
    assert_eq!(after.current("t", "default"), Some(&identity("r2")));
    // Both are known: a broker deciding alone while the store is away must not take r1 for new.
    let known: Vec<_> = after.known.iter().map(|p| &p.identity).collect();
    assert_eq!(known, [&identity("r1"), &identity("r2")]);
}

async fn pools_are_independent_and_scoped_to_their_tenant(f: Fixture) {
    f.store
        .register_identity("a", "default", &identity("r1"), 1)
        .await
        .unwrap();
    let state = f
        .store
        .register_identity("b", "default", &identity("r9"), 2)
        .await
        .unwrap();
    assert_eq!(state.current("a", "default"), Some(&identity("r1")));
    assert_eq!(state.current("b", "default"), Some(&identity("r9")));
    assert_eq!(state.current("a", "other"), None);
    // The identity r9 is new to tenant a's pool even though tenant b has it.
    let state = f
        .store
        .register_identity("a", "default", &identity("r9"), 3)
        .await
        .unwrap();
    assert_eq!(state.current("a", "default"), Some(&identity("r9")));
}

async fn the_generation_is_the_same_for_every_broker_of_the_store(f: Fixture) {
    let other = Store::connect(&f.url).await.unwrap();
    let state = f
        .store
        .register_identity("t", "default", &identity("r1"), 1)
        .await
        .unwrap();
    assert_eq!(other.fleet_state().await.unwrap(), state);
    // Concurrent registrations of different new identities are decided one at a time: each
    // moves the generation once.
    let (r2, r3) = (identity("r2"), identity("r3"));
    let (a, b) = tokio::join!(
        f.store.register_identity("t", "default", &r2, 2),
        other.register_identity("t", "default", &r3, 2)
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    let last = f.store.fleet_state().await.unwrap();
    assert_eq!(last.generation, state.generation + 2);
    assert!(a.generation.max(b.generation) == last.generation);
}

async fn a_claim_is_held_until_released_or_expired(f: Fixture) {
    let other = Store::connect(&f.url).await.unwrap();
    let sha = Sha256::of(b"new content");
    let id = identity("r1");
    let long = Duration::from_secs(60);
    assert_eq!(
        f.store
            .claim_scan(&sha, &id, "broker-a", long)
            .await
            .unwrap(),
        Claim::Won
    );
    // The owner may renew; anyone else sees it held.
    assert_eq!(
        f.store
            .claim_scan(&sha, &id, "broker-a", long)
            .await
            .unwrap(),
        Claim::Won
    );
    match other.claim_scan(&sha, &id, "broker-b", long).await.unwrap() {
        Claim::Held { owner, .. } => assert_eq!(owner, "broker-a"),
        Claim::Won => panic!("a held claim was taken"),
    }
    // Claims are per identity: another rule set's scan is a separate claim.
    assert_eq!(
        other
            .claim_scan(&sha, &identity("r2"), "broker-b", long)
            .await
            .unwrap(),
        Claim::Won
    );
    // Releasing by someone who does not hold it does nothing.
    other.release_claim(&sha, &id, "broker-b").await.unwrap();
    assert!(matches!(
        other.claim_scan(&sha, &id, "broker-b", long).await.unwrap(),
        Claim::Held { .. }
    ));
    f.store.release_claim(&sha, &id, "broker-a").await.unwrap();
    assert_eq!(
        other.claim_scan(&sha, &id, "broker-b", long).await.unwrap(),
        Claim::Won
    );

    // An owner that dies leaves a claim that expires: it is taken over after its ttl.
    let sha2 = Sha256::of(b"other content");
    assert_eq!(
        f.store
            .claim_scan(&sha2, &id, "dies", Duration::from_millis(300))
            .await
            .unwrap(),
        Claim::Won
    );
    assert!(matches!(
        other.claim_scan(&sha2, &id, "taker", long).await.unwrap(),
        Claim::Held { .. }
    ));
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(
        other.claim_scan(&sha2, &id, "taker", long).await.unwrap(),
        Claim::Won
    );
}

#[tokio::test]
async fn postgres_notifies_other_brokers_of_verdicts_and_fleet_changes() {
    let f = postgres_fixture().await;
    let other = Store::connect(&f.url).await.unwrap();
    let mut listener = other.listen().await.unwrap().expect("postgres listens");
    let sha = Sha256::of(b"content");
    let id = identity("r1");
    assert_eq!(
        f.store
            .claim_scan(&sha, &id, "a", Duration::from_secs(60))
            .await
            .unwrap(),
        Claim::Won
    );
    f.store.release_claim(&sha, &id, "a").await.unwrap();
    let notice = tokio::time::timeout(Duration::from_secs(5), listener.recv())
        .await
        .expect("a notice within 5 s")
        .unwrap();
    assert_eq!(notice, Notice::Verdict(sha));

    f.store
        .register_identity("t", "default", &id, 1)
        .await
        .unwrap();
    let notice = tokio::time::timeout(Duration::from_secs(5), listener.recv())
        .await
        .expect("a notice within 5 s")
        .unwrap();
    assert_eq!(notice, Notice::Fleet);
}

#[tokio::test]
async fn sqlite_has_no_listener() {
    let f = sqlite_fixture().await;
    assert!(f.store.listen().await.unwrap().is_none());
    f.store.ping().await.unwrap();
}
