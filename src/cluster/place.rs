//! Which node runs which slot: a pure function of the cluster's state, so every node computes
//! the same answer from the same watched keys.
//!
//! A slot (`web.3`) goes to the node that ranks it highest by rendezvous hashing of slot ×
//! node, among the nodes that hold fewer than their fair share of its type
//! (⌈count ÷ nodes⌉): bounded-load rendezvous. A claimed slot stays where it is (no node takes
//! another's running instance); only a node above its fair share, which a node joining makes,
//! gives one back, and the agent rate-limits that. A node computes only what *it* claims or
//! gives up; the claim's transaction is what makes a slot run on at most one node when two
//! nodes' views differ for a moment.

use std::collections::{BTreeMap, BTreeSet};

use crate::app::ProcessName;

/// A slot of the cluster's formation: type and index (`web`, 3).
pub type SlotId = (ProcessName, u32);

/// What one node does with the cluster's slots this round.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Share {
    /// Unclaimed slots that fall to this node: claim them.
    pub claim: Vec<SlotId>,
    /// Slots this node holds above its fair share of their type, highest index first: give
    /// one back to rebalance.
    pub surplus: Vec<SlotId>,
}

/// Decides what `me` claims and what it holds above its share, given each type's desired
/// count, the live nodes and the claims (slot → node).
pub fn share(
    counts: &BTreeMap<ProcessName, u32>,
    nodes: &BTreeSet<String>,
    claims: &BTreeMap<SlotId, String>,
    me: &str,
) -> Share {
    let mut share = Share::default();
    if !nodes.contains(me) {
        return share;
    }
    let n = nodes.len() as u32;
    for (process, &count) in counts {
        let cap = count.div_ceil(n);
        let mut load: BTreeMap<&str, u32> = nodes.iter().map(|n| (n.as_str(), 0)).collect();
        let mut held = BTreeSet::new();
        for ((p, index), node) in claims.range((process.clone(), 0)..=(process.clone(), u32::MAX)) {
            debug_assert_eq!(p, process);
            if *index > count {
                continue;
            }
            held.insert(*index);
            // A claim of a node not (yet) seen alive occupies its slot but no node's share:
            // it goes when that node's lease does.
            if let Some(l) = load.get_mut(node.as_str()) {
                *l += 1;
            }
        }
        for index in (1..=count).filter(|i| !held.contains(i)) {
            let mut ranked: Vec<&str> = nodes.iter().map(String::as_str).collect();
            ranked.sort_by_key(|node| std::cmp::Reverse(score(process, index, node)));
            let Some(&winner) = ranked.iter().find(|node| load[**node] < cap) else {
                continue;
            };
            *load.get_mut(winner).expect("a live node") += 1;
            if winner == me {
                share.claim.push((process.clone(), index));
            }
        }
        let mine = load[me];
        if mine > cap {
            let mut held_here: Vec<u32> = claims
                .iter()
                .filter(|((p, i), node)| p == process && *i <= count && node.as_str() == me)
                .map(|((_, i), _)| *i)
                .collect();
            held_here.sort_unstable_by(|a, b| b.cmp(a));
            share.surplus.extend(
                held_here
                    .into_iter()
                    .take((mine - cap) as usize)
                    .map(|i| (process.clone(), i)),
            );
        }
    }
    share
}

/// Rendezvous weight of `node` for slot `process.index`: FNV-1a over the three, then
/// splitmix64's finalizer so that close inputs spread. Stable across builds and machines (it
/// is part of the cluster's protocol: every node must rank alike).
fn score(process: &ProcessName, index: u32, node: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |bytes: &[u8]| {
        for &b in bytes {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    };
    eat(process.as_str().as_bytes());
    eat(&[0]);
    eat(&index.to_le_bytes());
    eat(&[0]);
    eat(node.as_bytes());
    let mut z = h.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn name(s: &str) -> ProcessName {
        ProcessName::new(s).unwrap()
    }

    fn nodes(n: usize) -> BTreeSet<String> {
        (1..=n).map(|i| format!("node{i}")).collect()
    }

    /// Runs rounds in which every node claims what `share` gives it (in node order, each
    /// seeing the claims before it, as etcd's transactions serialize them) until nothing
    /// changes; gives-back are applied one per node per round.
    fn settle(
        counts: &BTreeMap<ProcessName, u32>,
        nodes: &BTreeSet<String>,
        claims: &mut BTreeMap<SlotId, String>,
    ) {
        for _ in 0..100 {
            let mut changed = false;
            for node in nodes {
                let s = share(counts, nodes, claims, node);
                for slot in s.claim {
                    if let std::collections::btree_map::Entry::Vacant(e) = claims.entry(slot) {
                        e.insert(node.clone());
                        changed = true;
                    }
                }
                if let Some(slot) = s.surplus.first() {
                    claims.remove(slot);
                    changed = true;
                }
            }
            if !changed {
                return;
            }
        }
        panic!("placement did not settle: {claims:?}");
    }

    #[test]
    fn a_formation_spreads_evenly_and_every_slot_is_claimed_once() {
        let counts = BTreeMap::from([(name("web"), 6), (name("clock"), 1)]);
        let nodes = nodes(3);
        let mut claims = BTreeMap::new();
        settle(&counts, &nodes, &mut claims);
        assert_eq!(claims.len(), 7);
        for node in &nodes {
            let webs = claims
                .iter()
                .filter(|((p, _), n)| p.as_str() == "web" && *n == node)
                .count();
            assert_eq!(webs, 2, "{node}: {claims:?}");
        }
    }

    #[test]
    fn a_lost_nodes_slots_go_to_the_survivors_and_the_others_stay() {
        let counts = BTreeMap::from([(name("web"), 6)]);
        let mut claims = BTreeMap::new();
        settle(&counts, &nodes(3), &mut claims);
        let before = claims.clone();
        claims.retain(|_, n| n != "node2");
        let survivors: BTreeSet<String> = ["node1", "node3"].map(String::from).into();
        settle(&counts, &survivors, &mut claims);
        assert_eq!(claims.len(), 6);
        for (slot, node) in &before {
            if node != "node2" {
                assert_eq!(&claims[slot], node, "{slot:?} moved");
            }
        }
        assert!(claims.values().all(|n| n != "node2"));
    }

    #[test]
    fn a_joining_node_gets_its_share_by_gives_back_not_by_taking() {
        let counts = BTreeMap::from([(name("web"), 4)]);
        let one = nodes(1);
        let mut claims = BTreeMap::new();
        settle(&counts, &one, &mut claims);
        assert!(claims.values().all(|n| n == "node1"));
        // node2 joins: node1 is above ⌈4/2⌉ = 2 and gives back its highest indices.
        let two = nodes(2);
        let s = share(&counts, &two, &claims, "node1");
        assert_eq!(s.surplus, vec![(name("web"), 4), (name("web"), 3)]);
        assert!(share(&counts, &two, &claims, "node2").claim.is_empty());
        settle(&counts, &two, &mut claims);
        assert_eq!(claims.values().filter(|n| *n == "node2").count(), 2);
    }

    #[test]
    fn a_node_not_in_the_live_set_claims_nothing() {
        let counts = BTreeMap::from([(name("web"), 3)]);
        let s = share(&counts, &nodes(2), &BTreeMap::new(), "node9");
        assert_eq!(s, Share::default());
    }

    proptest! {
        /// Whatever the counts, nodes and the order of losses: every desired slot ends up
        /// claimed exactly once, by a live node, no node above ⌈count ÷ nodes⌉ of a type.
        #[test]
        fn placement_settles_balanced(
            web in 0u32..40,
            worker in 0u32..10,
            n in 1usize..6,
            lose in proptest::collection::vec(0usize..6, 0..3),
        ) {
            let counts = BTreeMap::from([(name("web"), web), (name("worker"), worker)]);
            let mut live = nodes(n);
            let mut claims = BTreeMap::new();
            settle(&counts, &live, &mut claims);
            for l in lose {
                if live.len() > 1 {
                    let gone = live.iter().nth(l % live.len()).unwrap().clone();
                    live.remove(&gone);
                    claims.retain(|_, node| *node != gone);
                    settle(&counts, &live, &mut claims);
                }
            }
            for (process, &count) in &counts {
                let cap = count.div_ceil(live.len() as u32);
                for i in 1..=count {
                    let node = claims.get(&(process.clone(), i));
                    prop_assert!(node.is_some_and(|n| live.contains(n)), "{process}.{i}");
                }
                for node in &live {
                    let held = claims.iter().filter(|((p, _), n)| p == process && *n == node).count();
                    prop_assert!(held as u32 <= cap, "{node} holds {held} of {process} (cap {cap})");
                }
            }
        }
    }
}
