//! How the bunkers served on one relay are spread over subscriptions.
//!
//! Relays cap the size of a message (strfry 128 KiB, nostr-rs-relay 256 KiB). One `REQ`
//! naming every bunker stopped being accepted at about 1,900 (strfry) or 3,900 bunkers, and
//! from then on no app on that relay was answered, with nothing in keycast's log but the
//! relay's `NOTICE`. So a relay gets one subscription per [`PER_SUBSCRIPTION`] bunkers
//! (a `REQ` of about 34 KiB), each under its own id.
//!
//! A bunker keeps its place for as long as it is served there: a new one takes the first
//! free place, one that ends frees its place. A subscription sent again under its id
//! replaces the old one on the relay at once, so a change sends only the subscriptions it
//! touched, and no bunker is ever between two of them. Cutting the sorted list anew at every
//! change would move bunkers from one subscription to the next, and a bunker moved would be
//! in neither for a moment: a request sent to it then would be lost.
//!
//! Relays also cap the subscriptions of one connection (strfry 20, nostr-rs-relay 32), which
//! puts the ceiling at 10,000 bunkers per relay on strfry's defaults.

use std::collections::HashSet;

use keycast_core::nostr::PublicKey;
use nostr_sdk::SubscriptionId;

/// Bunkers (`#p` values) per subscription: 500 × 67 bytes, well under any relay's cap on a
/// message.
pub const PER_SUBSCRIPTION: usize = 500;

/// Subscriptions on one connection that relays commonly accept (strfry's default; most
/// allow more): past it, keycast warns.
pub const COMMONLY_ACCEPTED: usize = 20;

const PREFIX: &str = "keycast-nip46-";

/// The id of the subscription at `index`.
pub fn id(index: usize) -> SubscriptionId {
    SubscriptionId::new(format!("{PREFIX}{index}"))
}

/// The index of one of keycast's subscriptions; `None` for any other id — `keycast-nip46-00`
/// or `-+0` too: a relay that named those in a `CLOSED` had each subscribed anew.
pub fn index(id: &SubscriptionId) -> Option<usize> {
    let index: usize = id.as_str().strip_prefix(PREFIX)?.parse().ok()?;
    (self::id(index) == *id).then_some(index)
}

/// The subscriptions a relay should have to name exactly `wanted`, given what it was sent
/// (`sent`, by index; an empty one is a free place). Bunkers already sent stay where they
/// are; the others fill free places in order, then new subscriptions. Each is sorted, and
/// trailing empty ones are left out.
pub fn plan(sent: &[Vec<PublicKey>], wanted: &[PublicKey]) -> Vec<Vec<PublicKey>> {
    let wanted_set: HashSet<&PublicKey> = wanted.iter().collect();
    let mut planned: Vec<Vec<PublicKey>> = sent
        .iter()
        .map(|bunkers| bunkers.iter().filter(|b| wanted_set.contains(b)).copied().collect())
        .collect();
    let placed: HashSet<PublicKey> = planned.iter().flatten().copied().collect();
    let mut slot = 0;
    for bunker in wanted.iter().filter(|b| !placed.contains(b)) {
        while planned.get(slot).is_some_and(|s| s.len() >= PER_SUBSCRIPTION) {
            slot += 1;
        }
        if slot == planned.len() {
            planned.push(Vec::new());
        }
        planned[slot].push(*bunker);
    }
    for bunkers in &mut planned {
        bunkers.sort_unstable();
        bunkers.dedup();
    }
    while planned.last().is_some_and(Vec::is_empty) {
        planned.pop();
    }
    planned
}

#[cfg(test)]
mod tests {
    use super::*;
    use keycast_core::nostr::Keys;

    fn bunkers(n: usize) -> Vec<PublicKey> {
        let mut keys: Vec<PublicKey> = (0..n).map(|_| Keys::generate().public_key()).collect();
        keys.sort_unstable();
        keys
    }

    fn sorted(mut keys: Vec<PublicKey>) -> Vec<PublicKey> {
        keys.sort_unstable();
        keys
    }

    #[test]
    fn a_relay_gets_a_subscription_per_five_hundred_bunkers() {
        let all = bunkers(1_201);
        let planned = plan(&[], &all);
        let sizes: Vec<usize> = planned.iter().map(Vec::len).collect();
        assert_eq!(sizes, [500, 500, 201]);
        assert_eq!(sorted(planned.concat()), all);
    }

    #[test]
    fn a_bunker_keeps_its_subscription_while_others_come_and_go() {
        let all = bunkers(1_000);
        let sent = plan(&[], &all);
        // One bunker of the first subscription ends, two new ones come (sorting first).
        let ended = sent[0][123];
        let mut wanted: Vec<PublicKey> = all.iter().copied().filter(|b| *b != ended).collect();
        let newcomers = bunkers(2);
        wanted.extend(&newcomers);
        let wanted = sorted(wanted);
        let planned = plan(&sent, &wanted);
        assert_eq!(planned.len(), 3, "one new subscription for the bunker with no room");
        for bunker in all.iter().filter(|b| **b != ended) {
            let before = sent.iter().position(|s| s.contains(bunker));
            let after = planned.iter().position(|s| s.contains(bunker));
            assert_eq!(before, after, "a bunker served all along moved");
        }
        assert!(planned[0].contains(&newcomers[0]), "the free place is taken first");
        assert_eq!(
            planned[1], sent[1],
            "a subscription the change did not touch is unchanged"
        );
        assert_eq!(planned[2], vec![newcomers[1]]);
        assert_eq!(sorted(planned.concat()), wanted);
    }

    #[test]
    fn subscriptions_left_empty_are_dropped_from_the_end_and_kept_as_free_places_before_it() {
        let all = bunkers(1_100);
        let sent = plan(&[], &all);
        let wanted: Vec<PublicKey> = all
            .iter()
            .copied()
            .filter(|b| !sent[1].contains(b) && !sent[2].contains(b))
            .collect();
        assert_eq!(plan(&sent, &wanted), vec![sent[0].clone()]);
        let wanted: Vec<PublicKey> = all.iter().copied().filter(|b| !sent[1].contains(b)).collect();
        assert_eq!(plan(&sent, &wanted), vec![sent[0].clone(), Vec::new(), sent[2].clone()]);
        assert!(plan(&sent, &[]).is_empty());
    }

    #[test]
    fn only_keycasts_own_ids_have_an_index() {
        assert_eq!(index(&id(7)), Some(7));
        assert_eq!(index(&SubscriptionId::new("keycast-nip46")), None);
        assert_eq!(index(&SubscriptionId::new("someone-else-3")), None);
        for other_spelling in ["keycast-nip46-07", "keycast-nip46-+7", "keycast-nip46-00"] {
            assert_eq!(index(&SubscriptionId::new(other_spelling)), None, "{other_spelling}");
        }
    }
}
