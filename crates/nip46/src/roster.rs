//! Who keycast serves where: the bunkers, the relays named by apps that each listens on
//! (under the cap), and the client each has bound. A snapshot is built from the database by
//! the service's sync and swapped in whole, so the receive loop reads it without waiting
//! for a rebuild (issue 12 item 6).
//!
//! The operator's relays (`BUNKER_RELAYS`, or the embedded relay) carry every bunker. A relay
//! named by an app carries only the bunkers whose authorizations name it, so it learns
//! nothing about anyone else's. At most `max_app_relays` distinct app relays are admitted,
//! the oldest live authorizations' first: the database may hold more (a cap lowered later,
//! or acceptances that raced), the connections never do.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

use keycast_core::nostr::{Event, PublicKey};
use nostr_sdk::RelayUrl;

/// `p` tags looked at to find the addressee (NIP-46 requests carry one).
const MAX_P_TAGS: usize = 4;

/// One authorization as the service needs it.
#[derive(Debug, Clone)]
pub struct Row {
    pub bunker: PublicKey,
    /// Every relay the authorization names (the operator's included).
    pub relays: Vec<RelayUrl>,
    /// The client bound by `connect`.
    pub client: Option<PublicKey>,
    /// Not revoked (a recently revoked bunker is still served, to answer "revoked").
    pub live: bool,
}

/// A served bunker.
#[derive(Debug, Clone, Default)]
pub struct Entry {
    /// The app relays it listens on besides the operator's (admitted under the cap).
    pub relays: Vec<RelayUrl>,
    /// The client bound by `connect`, when the roster was read.
    pub client: Option<PublicKey>,
    /// Not revoked when the roster was read.
    pub live: bool,
}

impl Entry {
    /// The client the bunker is bound to now, given the bindings made here since the roster
    /// was read (`bound_here`). None for a revoked bunker: it is served only to say so, and
    /// its former client gets a stranger's limits.
    pub fn client(&self, bound_here: Option<Option<PublicKey>>) -> Option<PublicKey> {
        if !self.live {
            return None;
        }
        bound_here.unwrap_or(self.client)
    }
}

/// See the module documentation.
#[derive(Debug, Default)]
pub struct Roster {
    bunkers: HashMap<PublicKey, Entry>,
    /// App relay → the bunkers that use it, sorted.
    on_relay: HashMap<RelayUrl, Vec<PublicKey>>,
    /// Every bunker, sorted: what the operator's relays subscribe to.
    all: Vec<PublicKey>,
    /// App relays named in the database but not admitted (over the cap).
    left_out: usize,
}

impl Roster {
    /// Builds the roster from `rows` (oldest first): live authorizations' app relays are
    /// admitted, in order, up to `max_app_relays` distinct ones. A revoked bunker is served on
    /// those only: it opens no connection of its own. Each app relay is a party keycast reads
    /// and answers, and the caps on relays count live grants only, so grants made and revoked
    /// in a loop kept one account's relays — wildcard DNS, 5 a grant — connected for a week
    /// each, up to the total cap.
    pub fn build(rows: Vec<Row>, operator: &HashSet<RelayUrl>, max_app_relays: usize) -> Roster {
        let (live, revoked): (Vec<Row>, Vec<Row>) = rows.into_iter().partition(|r| r.live);
        let mut roster = Roster::default();
        let mut left_out = HashSet::new();
        for row in live.into_iter().chain(revoked) {
            let mut entry = Entry {
                relays: Vec::new(),
                client: row.client,
                live: row.live,
            };
            for relay in row.relays {
                if operator.contains(&relay) || entry.relays.contains(&relay) {
                    continue;
                }
                let admitted =
                    roster.on_relay.contains_key(&relay) || (row.live && roster.on_relay.len() < max_app_relays);
                if !admitted {
                    // Only a live grant's relay is left out by the cap.
                    if row.live {
                        left_out.insert(relay);
                    }
                    continue;
                }
                roster.on_relay.entry(relay.clone()).or_default().push(row.bunker);
                entry.relays.push(relay);
            }
            roster.bunkers.insert(row.bunker, entry);
        }
        for bunkers in roster.on_relay.values_mut() {
            bunkers.sort_unstable();
            bunkers.dedup();
        }
        roster.all = roster.bunkers.keys().copied().collect();
        roster.all.sort_unstable();
        roster.left_out = left_out.len();
        roster
    }

    /// The bunker a request that came on `relay` is for (the first of its first few `p` tags
    /// that keycast serves there) and its entry. An operator relay carries every bunker; an
    /// app's relay only those whose grants name it: answered for any bunker it tags, a relay
    /// could ask whether a key is a keycast bunker, and whether it is revoked.
    pub fn addressee(&self, event: &Event, relay: &RelayUrl, operator: bool) -> Option<(PublicKey, &Entry)> {
        let here = (!operator).then(|| self.on_relay.get(relay).map(Vec::as_slice).unwrap_or_default());
        event
            .tags
            .public_keys()
            .take(MAX_P_TAGS)
            .filter(|pk| here.is_none_or(|here| here.binary_search(pk).is_ok()))
            .find_map(|pk| self.bunkers.get(pk).map(|entry| (*pk, entry)))
    }

    pub fn entry(&self, bunker: &PublicKey) -> Option<&Entry> {
        self.bunkers.get(bunker)
    }

    /// The app relays admitted.
    pub fn app_relays(&self) -> impl Iterator<Item = &RelayUrl> {
        self.on_relay.keys()
    }

    /// The bunkers a relay's subscription names: all of them on an operator's relay,
    /// those that use it on an app relay (none on a relay not in the roster).
    pub fn bunkers_on(&self, relay: &RelayUrl, operator: bool) -> &[PublicKey] {
        if operator {
            return &self.all;
        }
        self.on_relay.get(relay).map_or(&[], Vec::as_slice)
    }

    /// Bunkers served.
    pub fn len(&self) -> usize {
        self.bunkers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.bunkers.is_empty()
    }

    /// App relays over the cap, not connected to.
    pub fn left_out(&self) -> usize {
        self.left_out
    }

    /// Whether `other` serves the same bunkers (relays and clients aside).
    pub fn same_bunkers(&self, other: &Roster) -> bool {
        self.all == other.all
    }
}

/// Clients bound or unbound here since the roster was last read (`connect` and `logout`
/// answered by this instance), so the very next request of a client that just connected
/// is not taken for a stranger's. Entries live through the next full read of the database
/// (two generations, rotated at each sync, the older dropped whole).
#[derive(Debug, Default)]
pub struct Bindings {
    /// (current, previous) generations: bunker → its client (`None`: unbound).
    inner: Mutex<(BindingMap, BindingMap)>,
}

type BindingMap = HashMap<PublicKey, Option<PublicKey>>;

impl Bindings {
    /// `bunker` is now bound to `client` (`None`: to nobody).
    pub fn set(&self, bunker: PublicKey, client: Option<PublicKey>) {
        if let Ok(mut generations) = self.inner.lock() {
            generations.0.insert(bunker, client);
        }
    }

    /// The binding made here since the roster was read, if any.
    pub fn get(&self, bunker: &PublicKey) -> Option<Option<PublicKey>> {
        let generations = self.inner.lock().ok()?;
        generations.0.get(bunker).or_else(|| generations.1.get(bunker)).copied()
    }

    /// Called before each read of the database: what was set before the previous read is
    /// in the database now.
    pub fn rotate(&self) {
        let expired = match self.inner.lock() {
            Ok(mut generations) => {
                let current = std::mem::take(&mut generations.0);
                std::mem::replace(&mut generations.1, current)
            }
            Err(_) => return,
        };
        drop(expired);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> PublicKey {
        keycast_core::nostr::Keys::generate().public_key()
    }

    fn relay(n: u16) -> RelayUrl {
        RelayUrl::parse(&format!("ws://127.0.0.1:{n}")).unwrap()
    }

    fn row(relays: &[u16], live: bool) -> Row {
        Row {
            bunker: key(),
            relays: relays.iter().map(|n| relay(*n)).collect(),
            client: None,
            live,
        }
    }

    #[test]
    fn an_app_relay_carries_only_the_bunkers_that_name_it() {
        let operator: HashSet<RelayUrl> = [relay(1)].into();
        let (a, b, c) = (row(&[1, 2], true), row(&[1, 3], true), row(&[1], true));
        let (ka, kb, kc) = (a.bunker, b.bunker, c.bunker);
        let roster = Roster::build(vec![a, b, c], &operator, 10);
        assert_eq!(roster.bunkers_on(&relay(2), false), [ka]);
        assert_eq!(roster.bunkers_on(&relay(3), false), [kb]);
        let mut all = vec![ka, kb, kc];
        all.sort_unstable();
        assert_eq!(roster.bunkers_on(&relay(1), true), all);
        assert_eq!(
            roster.entry(&kc).unwrap().relays,
            [],
            "the operator's relay is not an app relay"
        );
        assert_eq!(roster.entry(&ka).unwrap().relays, [relay(2)]);
    }

    #[test]
    fn app_relays_beyond_the_cap_are_left_out_live_authorizations_first() {
        let operator = HashSet::new();
        let revoked = row(&[9], false);
        let (a, b) = (row(&[1, 2], true), row(&[2, 3], true));
        let (ka, kb) = (a.bunker, b.bunker);
        let roster = Roster::build(vec![revoked, a, b], &operator, 2);
        let mut admitted: Vec<&RelayUrl> = roster.app_relays().collect();
        admitted.sort_by_key(|r| r.to_string());
        assert_eq!(admitted, [&relay(1), &relay(2)]);
        assert_eq!(
            roster.left_out(),
            1,
            "relay 3 (9 is a revoked grant's: never admitted, not over the cap)"
        );
        assert_eq!(roster.entry(&ka).unwrap().relays, [relay(1), relay(2)]);
        assert_eq!(
            roster.entry(&kb).unwrap().relays,
            [relay(2)],
            "a relay in use is shared"
        );
        assert_eq!(roster.len(), 3, "every bunker is still served on the operator's relays");
    }

    /// A revoked bunker answers "revoked" where keycast listens anyway (the operator's relays,
    /// an app relay a live grant uses); before, each of its own relays was a connection opened
    /// for it, for a week.
    #[test]
    fn a_revoked_bunker_opens_no_app_relay_of_its_own() {
        let operator = HashSet::new();
        let live = row(&[1], true);
        let (revoked, shared) = (row(&[7, 8], false), row(&[1, 9], false));
        let (kr, ks) = (revoked.bunker, shared.bunker);
        let roster = Roster::build(vec![revoked, live, shared], &operator, 10);
        let admitted: Vec<&RelayUrl> = roster.app_relays().collect();
        assert_eq!(admitted, [&relay(1)]);
        assert_eq!(roster.entry(&kr).unwrap().relays, []);
        assert_eq!(
            roster.entry(&ks).unwrap().relays,
            [relay(1)],
            "a relay a live grant uses"
        );
        assert_eq!(roster.len(), 3, "every bunker is still served on the operator's relays");
    }

    #[test]
    fn a_revoked_bunker_has_no_client_of_its_own() {
        let (client, operator) = (key(), HashSet::new());
        let (live, revoked) = (
            Row {
                client: Some(client),
                ..row(&[], true)
            },
            Row {
                client: Some(client),
                ..row(&[], false)
            },
        );
        let (live_bunker, revoked_bunker) = (live.bunker, revoked.bunker);
        let roster = Roster::build(vec![live, revoked], &operator, 10);
        let (live, revoked) = (
            roster.entry(&live_bunker).unwrap(),
            roster.entry(&revoked_bunker).unwrap(),
        );
        assert_eq!(live.client(None), Some(client));
        assert_eq!(live.client(Some(None)), None, "logged out here");
        assert_eq!(revoked.client(None), None);
        assert_eq!(revoked.client(Some(Some(client))), None, "connected here before");
    }

    #[test]
    fn a_binding_made_here_lasts_until_the_database_has_been_read_again() {
        let bindings = Bindings::default();
        let (bunker, client) = (key(), key());
        bindings.set(bunker, Some(client));
        assert_eq!(bindings.get(&bunker), Some(Some(client)));
        bindings.rotate(); // a sync whose read may have started before the binding
        assert_eq!(bindings.get(&bunker), Some(Some(client)));
        bindings.rotate(); // a sync that read it from the database
        assert_eq!(bindings.get(&bunker), None);
    }
}
