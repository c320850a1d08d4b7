//! The supervisor's decisions, as pure functions of what is desired and what runs.
//!
//! [`plan`] answers "given the desired formation and the slots that exist, which slots stop,
//! which instances start, and which wait (and why)"; [`replacement`] answers "how does a new
//! instance take an old one's place under the memory budget". Neither touches a slot, a task
//! or a clock: the supervisor applies their answers under its state lock, and the property
//! tests below hold them to the rules (the budget, the instance pool, singletons, one slot per
//! index).

use std::collections::BTreeSet;
use std::fmt;

use crate::app::{ByteSize, ProcessName};
use crate::formation::Scale;

/// What the planner sees of one existing slot.
#[derive(Clone, Copy, Debug)]
pub(super) struct Held<'a> {
    pub process: &'a ProcessName,
    pub index: u32,
    /// Its memory limit: reserved until the slot has ended, draining or not.
    pub memory: ByteSize,
    /// Told to stop (draining): it no longer holds its index, but still its memory.
    pub stopping: bool,
}

/// One desired type.
#[derive(Clone, Copy, Debug)]
pub(super) struct Wanted<'a> {
    pub process: &'a ProcessName,
    pub scale: Scale,
    /// At most one instance alive at any time: a new one waits until every slot of the type
    /// has ended.
    pub singleton: bool,
    /// Whether the type has a version to start (a desired type always has one but for a
    /// deploy's transient states).
    pub startable: bool,
    /// In a cluster: the indices of the type this node holds claims for; the others run on
    /// other nodes. `None`: this host runs every index (`1..=count`).
    pub here: Option<&'a BTreeSet<u32>>,
}

impl Wanted<'_> {
    /// Whether index `index` of the type should run on this host.
    fn wants(&self, index: u32) -> bool {
        index <= self.scale.count && self.here.is_none_or(|here| here.contains(&index))
    }
}

/// Host-wide limits the plan keeps.
#[derive(Clone, Copy, Debug)]
pub(super) struct Room {
    /// Σ memory limits of existing slots stays within it.
    pub capacity: ByteSize,
    /// Slots, stopping ones included, stay within it.
    pub max_instances: u32,
}

/// Why a desired instance does not start now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Short {
    /// Every instance of the engine's pool is taken.
    PoolFull { max_instances: u32 },
    /// The memory budget has no room for it, even once the stopping instances have ended.
    Capacity {
        needs: ByteSize,
        in_use: ByteSize,
        capacity: ByteSize,
    },
    /// It fits once the stopping instances have ended (a roll in progress).
    Stopping,
}

impl fmt::Display for Short {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Short::PoolFull { max_instances } => write!(
                f,
                "the instance pool is full ({max_instances} instances; restart `wasmform up` with a larger `--max-instances`)"
            ),
            Short::Capacity {
                needs,
                in_use,
                capacity,
            } => write!(f, "capacity: needs {needs}, {in_use} of {capacity} in use"),
            Short::Stopping => f.write_str("waiting for a stopping instance to end"),
        }
    }
}

/// What the supervisor does to bring the slots in line with the desired formation.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct Plan {
    /// Positions in the given slots of those to stop: of undesired types, or above their
    /// type's count.
    pub stop: Vec<usize>,
    /// Instances to start, in order.
    pub start: Vec<(ProcessName, u32)>,
    /// Desired instances that neither run nor start, in type and index order.
    pub pending: Vec<(ProcessName, u32, Short)>,
}

/// Decides what stops, what starts and what waits.
///
/// Surplus slots stop first (an undesired type's, then those above their type's count); they
/// keep their memory until they have ended, so the room they free counts only then. Missing
/// indices (`1..=count` that no running slot holds) start in type order, then index order, as
/// far as the instance pool and the memory budget allow; the first that does not fit ends its
/// type's starts (the others of the type would not fit either, or would start out of order).
/// A singleton starts only when no slot of its type exists, stopping ones included.
///
/// The rest is pending: with the reason that the pool is full, that the budget has no room even
/// once the stopping slots have ended (counting the pending instances before it, in order), or
/// that it waits for stopping slots to end.
pub(super) fn plan(wanted: &[Wanted<'_>], slots: &[Held<'_>], room: Room) -> Plan {
    let mut plan = Plan::default();
    let desired = |process: &ProcessName| wanted.iter().find(|w| w.process == process);
    let mut stopping: Vec<bool> = slots.iter().map(|s| s.stopping).collect();
    // Undesired types first, then surplus indices, so the order of `stop` is the order of the
    // log lines the supervisor writes.
    for (i, slot) in slots.iter().enumerate() {
        if !stopping[i] && desired(slot.process).is_none() {
            stopping[i] = true;
            plan.stop.push(i);
        }
    }
    for w in wanted {
        for (i, slot) in slots.iter().enumerate() {
            if !stopping[i] && slot.process == w.process && !w.wants(slot.index) {
                stopping[i] = true;
                plan.stop.push(i);
            }
        }
    }
    // The world after the stops and starts: (process, index, memory, stopping).
    let mut after: Vec<(&ProcessName, u32, ByteSize, bool)> = slots
        .iter()
        .zip(&stopping)
        .map(|(s, &stopping)| (s.process, s.index, s.memory, stopping))
        .collect();
    for w in wanted.iter().filter(|w| w.startable) {
        for index in missing(&after, w) {
            if fits(&after, w.scale.memory, room).is_err() {
                break;
            }
            if w.singleton && after.iter().any(|(p, ..)| *p == w.process) {
                break;
            }
            after.push((w.process, index, w.scale.memory, false));
            plan.start.push((w.process.clone(), index));
        }
    }
    let mut staying: u64 = after
        .iter()
        .filter(|(.., stopping)| !stopping)
        .map(|(_, _, m, _)| m.as_u64())
        .sum();
    for w in wanted {
        for index in missing(&after, w) {
            let reason = match fits(&after, w.scale.memory, room) {
                Err(Short::PoolFull { max_instances }) => Short::PoolFull { max_instances },
                Err(short) if staying + w.scale.memory.as_u64() > room.capacity.as_u64() => short,
                _ => {
                    staying += w.scale.memory.as_u64();
                    Short::Stopping
                }
            };
            plan.pending.push((w.process.clone(), index, reason));
        }
    }
    plan
}

/// Indices of `wanted` here that no running (not stopping) slot of its type holds.
fn missing(slots: &[(&ProcessName, u32, ByteSize, bool)], wanted: &Wanted<'_>) -> Vec<u32> {
    let held: BTreeSet<u32> = slots
        .iter()
        .filter(|(p, _, _, stopping)| *p == wanted.process && !stopping)
        .map(|(_, index, ..)| *index)
        .collect();
    (1..=wanted.scale.count)
        .filter(|i| wanted.wants(*i) && !held.contains(i))
        .collect()
}

/// Whether one more instance of `memory` fits beside `slots` now.
fn fits(
    slots: &[(&ProcessName, u32, ByteSize, bool)],
    memory: ByteSize,
    room: Room,
) -> Result<(), Short> {
    if slots.len() >= room.max_instances as usize {
        return Err(Short::PoolFull {
            max_instances: room.max_instances,
        });
    }
    let reserved: u64 = slots.iter().map(|(_, _, m, _)| m.as_u64()).sum();
    if reserved + memory.as_u64() > room.capacity.as_u64() {
        return Err(Short::Capacity {
            needs: memory,
            in_use: ByteSize::bytes(reserved),
            capacity: room.capacity,
        });
    }
    Ok(())
}

/// How a new instance replaces an old one (a rolling restart, a memory change, a deploy).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Replacement {
    /// The new one starts beside the old one, which drains once the new one is up.
    /// `after_draining`: it fits only once the instances already stopping have ended, so it
    /// waits for them.
    Surge { after_draining: bool },
    /// The new one fits only in the old one's room: the old one stops first, and the new one
    /// waits for it and for the instances already stopping.
    StopFirst,
    /// A singleton: the old one stops first, and the new one waits for it and for any other
    /// instance of the type still stopping, so two never run at once.
    Singleton,
    /// It does not fit even in the old one's room: the old one stops and its index is pending
    /// until room frees.
    Pending,
}

/// What the replacement of one instance sees of the budget.
#[derive(Clone, Copy, Debug)]
pub(super) struct Budget {
    pub capacity: ByteSize,
    /// Σ memory of the slots not stopping (the old one included).
    pub staying: ByteSize,
    /// Σ memory of every slot, stopping ones included.
    pub reserved: ByteSize,
}

/// Decides how an instance of `old` memory is replaced by one of `new` memory.
pub(super) fn replacement(
    budget: Budget,
    old: ByteSize,
    new: ByteSize,
    singleton: bool,
) -> Replacement {
    let capacity = budget.capacity.as_u64();
    let staying = budget.staying.as_u64();
    let surge = staying + new.as_u64() <= capacity;
    let instead = staying.saturating_sub(old.as_u64()) + new.as_u64() <= capacity;
    if !surge && !instead {
        Replacement::Pending
    } else if !surge {
        Replacement::StopFirst
    } else if singleton {
        Replacement::Singleton
    } else {
        Replacement::Surge {
            after_draining: budget.reserved.as_u64() + new.as_u64() > capacity,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn names() -> Vec<ProcessName> {
        ["clock", "web", "worker"]
            .iter()
            .map(|n| ProcessName::new(n).unwrap())
            .collect()
    }

    const MIB: u64 = 1 << 20;

    /// Slots as (type, index, memory in MiB, stopping), formations as (count, MiB, singleton).
    #[derive(Clone, Debug)]
    struct World {
        slots: Vec<(usize, u32, u64, bool)>,
        wanted: Vec<Option<(u32, u64, bool)>>,
        capacity: u64,
        max_instances: u32,
        /// In a cluster: the indices every type holds here (`None`: all of them).
        here: Option<BTreeSet<u32>>,
    }

    impl World {
        /// Whether index `index` of a type of `count` should run here.
        fn wants(&self, count: u32, index: u32) -> bool {
            index <= count && self.here.as_ref().is_none_or(|h| h.contains(&index))
        }
    }

    fn world() -> impl Strategy<Value = World> {
        (
            prop::collection::vec((0..3usize, 1..6u32, 1..5u64, any::<bool>()), 0..10),
            prop::collection::vec(
                prop::option::of((0..6u32, 1..5u64, prop::bool::weighted(0.2))),
                3,
            ),
            1..40u64,
            1..16u32,
            prop::option::of(prop::collection::btree_set(1..6u32, 0..5)),
        )
            .prop_map(|(mut slots, wanted, capacity, max_instances, here)| {
                // At most one running slot per index, as the supervisor keeps it.
                let mut seen = BTreeSet::new();
                slots.retain(|&(t, i, _, stopping)| stopping || seen.insert((t, i)));
                World {
                    slots,
                    wanted,
                    capacity,
                    max_instances,
                    here,
                }
            })
    }

    fn run(w: &World) -> (Vec<ProcessName>, Plan) {
        let names = names();
        let held: Vec<Held<'_>> = w
            .slots
            .iter()
            .map(|&(t, index, mib, stopping)| Held {
                process: &names[t],
                index,
                memory: ByteSize::bytes(mib * MIB),
                stopping,
            })
            .collect();
        let here = w.here.as_ref();
        let wanted: Vec<Wanted<'_>> = w
            .wanted
            .iter()
            .enumerate()
            .filter_map(|(t, w)| {
                let (count, mib, singleton) = (*w)?;
                Some(Wanted {
                    process: &names[t],
                    scale: Scale {
                        count: if singleton { count.min(1) } else { count },
                        memory: ByteSize::bytes(mib * MIB),
                    },
                    singleton,
                    startable: true,
                    here,
                })
            })
            .collect();
        let room = Room {
            capacity: ByteSize::bytes(w.capacity * MIB),
            max_instances: w.max_instances,
        };
        let plan = plan(&wanted, &held, room);
        (names.clone(), plan)
    }

    /// The slots after applying `plan` to `w`.
    fn apply(w: &World, plan: &Plan) -> World {
        let names = names();
        let mut next = w.clone();
        for &i in &plan.stop {
            next.slots[i].3 = true;
        }
        for (process, index) in &plan.start {
            let t = names.iter().position(|n| n == process).unwrap();
            let mib = w.wanted[t].unwrap().1;
            next.slots.push((t, *index, mib, false));
        }
        next
    }

    proptest! {
        #[test]
        fn starts_stay_within_the_budget_and_the_pool(w in world()) {
            let (_, plan) = run(&w);
            let next = apply(&w, &plan);
            let reserved = |w: &World| w.slots.iter().map(|s| s.2).sum::<u64>();
            if !plan.start.is_empty() {
                prop_assert!(reserved(&next) <= w.capacity);
                prop_assert!(next.slots.len() <= w.max_instances as usize);
            }
        }

        #[test]
        fn every_desired_index_runs_starts_or_is_pending_exactly_once(w in world()) {
            let (names, plan) = run(&w);
            let next = apply(&w, &plan);
            for (t, wanted) in w.wanted.iter().enumerate() {
                let Some((count, _, singleton)) = *wanted else { continue };
                let count = if singleton { count.min(1) } else { count };
                for index in (1..=count).filter(|&i| w.wants(count, i)) {
                    let running = next.slots.iter().filter(|s| s.0 == t && s.1 == index && !s.3).count();
                    let pending = plan.pending.iter().filter(|p| p.0 == names[t] && p.1 == index).count();
                    prop_assert_eq!(running + pending, 1, "{}.{}", names[t], index);
                }
            }
        }

        #[test]
        fn nothing_runs_beyond_the_formation(w in world()) {
            let (_, plan) = run(&w);
            let next = apply(&w, &plan);
            for s in next.slots.iter().filter(|s| !s.3) {
                let within = w.wanted[s.0].is_some_and(|(count, _, singleton)| {
                    w.wants(if singleton { count.min(1) } else { count }, s.1)
                });
                prop_assert!(within, "{s:?} is beyond {:?}", w.wanted);
            }
        }

        #[test]
        fn a_singleton_never_starts_beside_another_slot_of_its_type(w in world()) {
            let (names, plan) = run(&w);
            for (process, _) in &plan.start {
                let t = names.iter().position(|n| n == process).unwrap();
                if w.wanted[t].unwrap().2 {
                    prop_assert!(!w.slots.iter().any(|s| s.0 == t));
                }
            }
        }

        #[test]
        fn planning_again_changes_nothing(w in world()) {
            let (_, plan) = run(&w);
            let next = apply(&w, &plan);
            let (_, again) = run(&next);
            prop_assert!(again.stop.is_empty() && again.start.is_empty(), "{again:?}");
            prop_assert_eq!(again.pending, plan.pending);
        }

        #[test]
        fn a_replacement_never_overruns_the_budget(
            staying in 0..40u64, extra in 0..20u64, old in 1..8u64, new in 1..8u64,
            capacity in 1..48u64, singleton in any::<bool>(),
        ) {
            let staying = staying.max(old); // the old one is among the staying
            let reserved = staying + extra;
            let budget = Budget {
                capacity: ByteSize::bytes(capacity * MIB),
                staying: ByteSize::bytes(staying * MIB),
                reserved: ByteSize::bytes(reserved * MIB),
            };
            let r = replacement(budget, ByteSize::bytes(old * MIB), ByteSize::bytes(new * MIB), singleton);
            match r {
                // Starts now, beside everything.
                Replacement::Surge { after_draining: false } => prop_assert!(reserved + new <= capacity),
                // Starts once the stopping ones have ended, beside the staying ones.
                Replacement::Surge { after_draining: true } => prop_assert!(staying + new <= capacity),
                Replacement::StopFirst | Replacement::Singleton => prop_assert!(staying - old + new <= capacity),
                Replacement::Pending => prop_assert!(staying - old + new > capacity),
            }
            prop_assert!(!(singleton && matches!(r, Replacement::Surge { .. })), "a singleton never surges");
        }
    }

    #[test]
    fn pending_says_why_in_the_words_of_ps() {
        let w = World {
            slots: vec![(1, 1, 4, false), (1, 2, 4, true)],
            wanted: vec![None, Some((4, 4, false)), None],
            capacity: 10,
            max_instances: 16,
            here: None,
        };
        let (names, plan) = run(&w);
        assert!(plan.start.is_empty(), "web.2 is still stopping: {plan:?}");
        let reasons: Vec<String> = plan
            .pending
            .iter()
            .map(|(p, i, why)| format!("{p}.{i}: {why}"))
            .collect();
        assert_eq!(
            reasons,
            [
                "web.2: waiting for a stopping instance to end",
                "web.3: capacity: needs 4 MiB, 8 MiB of 10 MiB in use",
                "web.4: capacity: needs 4 MiB, 8 MiB of 10 MiB in use",
            ],
            "{names:?}"
        );
        let full = World {
            max_instances: 2,
            ..w
        };
        let (_, plan) = run(&full);
        assert_eq!(
            plan.pending[0].2.to_string(),
            "the instance pool is full (2 instances; restart `wasmform up` with a larger `--max-instances`)"
        );
    }
}
