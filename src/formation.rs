//! The formation: how many instances of each process type should run, and with how much memory.
//!
//! Pure data and parsing; no wasmtime, no async. The supervisor turns a [`Formation`] into
//! running instances.

use std::collections::BTreeMap;
use std::fmt;

use crate::app::{AppSpec, ByteSize, ProcessName, ProcessSpec};

/// The largest count accepted for one process type.
pub const MAX_COUNT: u32 = 10_000;

/// Desired state of one process type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Scale {
    /// Number of instances.
    pub count: u32,
    /// Memory limit of each instance (sum of its linear memories).
    pub memory: ByteSize,
}

impl Scale {
    /// A type's scale once a new release of its manifest entry replaces `old`: the manifest's
    /// `count` and `memory` apply where they changed between the two; otherwise the live scale
    /// (the last `scale`) stays. The same rule for `up` over a stored formation and for a
    /// deploy over the running one. `default_memory` is the memory of a type whose manifest
    /// entry no longer sets one.
    pub fn follow_manifest(
        self,
        old: &ProcessSpec,
        new: &ProcessSpec,
        default_memory: ByteSize,
    ) -> Scale {
        let mut scale = self;
        if new.count != old.count {
            scale.count = new.count.unwrap_or(1);
        }
        if new.memory != old.memory {
            scale.memory = new.memory.unwrap_or(default_memory);
        }
        scale
    }

    /// The scale of a type a release adds: its manifest's `count` (else 1) and `memory`.
    pub fn of_new(spec: &ProcessSpec, default_memory: ByteSize) -> Scale {
        Scale {
            count: spec.count.unwrap_or(1),
            memory: spec.memory.unwrap_or(default_memory),
        }
    }
}

/// Desired state of every process type of an app.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Formation {
    /// Keyed by type; every type of the app is present (count 0 if it should not run).
    types: BTreeMap<ProcessName, Scale>,
}

impl Formation {
    /// Each type's manifest `count` and `memory`, else one instance with `memory` (foreman's
    /// default).
    pub fn default_for(app: &AppSpec, memory: ByteSize) -> Self {
        let types = app
            .processes
            .iter()
            .map(|p| {
                let scale = Scale {
                    count: p.count.unwrap_or(1),
                    memory: p.memory.unwrap_or(memory),
                };
                (p.name.clone(), scale)
            })
            .collect();
        Self { types }
    }

    /// Applies foreman's `-m` syntax: `web=2,worker=1`, `all=0,web=1`. `all=N` sets every type
    /// and the named types override it, whatever the order. As in `scale`, a count may carry
    /// the memory limit: `web=2:512MiB`. The whole spec is rejected if any part is invalid;
    /// `self` is then unchanged.
    pub fn apply_spec(&mut self, spec: &str) -> Result<(), String> {
        let known = || self.known();
        let mut all = None;
        let mut named = Vec::new();
        for part in spec.split([',', ' ']).filter(|s| !s.trim().is_empty()) {
            let part = part.trim();
            let Some((name, count)) = part.split_once('=') else {
                return Err(format!(
                    "invalid formation entry `{part}`: expected `TYPE=COUNT`, e.g. `web=2`"
                ));
            };
            let name = name.trim();
            if name.is_empty() {
                return Err(format!(
                    "invalid formation entry `{part}`: missing the process type before `=` (known types: {})",
                    known()
                ));
            }
            let (count, memory) = match count.trim().split_once(':') {
                Some((count, size)) => {
                    let size = size
                        .parse::<ByteSize>()
                        .map_err(|e| format!("`{part}`: {e}"))?;
                    (count, Some(size))
                }
                None => (count.trim(), None),
            };
            let count = (parse_count(name, count)?, memory);
            if name == "all" {
                all = Some(count);
                continue;
            }
            let Some((key, _)) = self.types.get_key_value(name) else {
                return Err(format!(
                    "unknown process type `{name}` in formation `{part}`: known types are {}",
                    known()
                ));
            };
            named.push((key.clone(), count));
        }
        let set = |scale: &mut Scale, (count, memory): (u32, Option<ByteSize>)| {
            scale.count = count;
            scale.memory = memory.unwrap_or(scale.memory);
        };
        if let Some(all) = all {
            for scale in self.types.values_mut() {
                set(scale, all);
            }
        }
        for (name, count) in named {
            set(self.types.get_mut(&name).expect("checked above"), count);
        }
        Ok(())
    }

    /// Applies Heroku's `ps:scale` changes: `web=3`, `worker+1`, `clock-1`, `web=2:512MiB`,
    /// several at once; only the named types change. `memory` (`--memory`) applies to every
    /// named type without its own `:SIZE`. `max_memory` is the largest limit the host accepts.
    /// Returns the new formation; on any invalid change nothing is returned and `self` is
    /// unchanged.
    pub fn with_changes(
        &self,
        changes: &[String],
        memory: Option<ByteSize>,
        max_memory: ByteSize,
    ) -> Result<Self, String> {
        self.with_named_changes(changes, memory, max_memory)
            .map(|(next, _)| next)
    }

    /// [`Formation::with_changes`], also returning the types the changes named (each once, in
    /// the order named). One pass over the changes, each checked where it is read, so that the
    /// error names the change at fault.
    pub fn with_named_changes(
        &self,
        changes: &[String],
        memory: Option<ByteSize>,
        max_memory: ByteSize,
    ) -> Result<(Self, Vec<ProcessName>), String> {
        if changes.is_empty() {
            return Err(
                "nothing to scale: give changes like `web=3`, `worker+1` or `clock=0`".into(),
            );
        }
        let known = self.known();
        let mut next = self.clone();
        let mut named = Vec::new();
        for change in changes
            .iter()
            .flat_map(|c| c.split([',', ' ']))
            .filter(|c| !c.is_empty())
        {
            // Type names may contain `-`: prefer a known name followed by an operator, so that
            // `my-worker-1` means "my-worker minus 1".
            let known_split = self
                .types
                .keys()
                .map(|k| k.as_str().len())
                .filter(|&len| {
                    change.len() > len
                        && change.is_char_boundary(len)
                        && self.types.contains_key(&change[..len])
                        && matches!(change.as_bytes()[len], b'=' | b'+' | b'-')
                })
                .max();
            let split = known_split
                .or_else(|| change.find(['=', '+', '-']))
                .ok_or_else(|| format!("invalid change `{change}`: expected `TYPE=N`, `TYPE+N` or `TYPE-N`, e.g. `web=3`"))?;
            let (name, rest) = change.split_at(split);
            let (op, value) = rest.split_at(1);
            if name.is_empty() {
                return Err(format!(
                    "invalid change `{change}`: missing the process type before `{op}` (known types: {known})"
                ));
            }
            let Some((key, current)) = next.types.get_key_value(name).map(|(k, v)| (k.clone(), *v))
            else {
                return Err(format!(
                    "unknown process type `{name}` in `{change}`: known types are {known}"
                ));
            };
            let (count, size) = match value.split_once(':') {
                Some((count, size)) => {
                    let size = size
                        .parse::<ByteSize>()
                        .map_err(|e| format!("`{change}`: {e}"))?;
                    (count, Some(size))
                }
                None => (value, None),
            };
            let n = parse_count(name, count)?;
            let count = match op {
                "=" => n,
                "+" => current
                    .count
                    .checked_add(n)
                    .filter(|c| *c <= MAX_COUNT)
                    .ok_or_else(|| {
                        format!(
                            "`{change}` would scale `{name}` to more than {MAX_COUNT} instances"
                        )
                    })?,
                _ => current.count.checked_sub(n).ok_or_else(|| {
                    format!(
                        "`{change}` would scale `{name}` below 0 (it has {})",
                        current.count
                    )
                })?,
            };
            let memory = size.or(memory).unwrap_or(current.memory);
            if memory > max_memory {
                return Err(format!(
                    "memory {memory} for `{name}` is above this host's maximum of {max_memory}: restart `wasmform up` with a larger `--max-memory`"
                ));
            }
            if !named.contains(&key) {
                named.push(key.clone());
            }
            next.types.insert(key, Scale { count, memory });
        }
        Ok((next, named))
    }

    /// Sets one type's scale (used when restoring a stored formation).
    pub fn set(&mut self, name: &ProcessName, scale: Scale) -> bool {
        match self.types.get_mut(name) {
            Some(slot) => {
                *slot = scale;
                true
            }
            None => false,
        }
    }

    /// Adds a type that a deploy brought, or replaces its scale.
    pub fn insert(&mut self, name: ProcessName, scale: Scale) {
        self.types.insert(name, scale);
    }

    /// Drops a type that a deploy removed.
    pub fn remove(&mut self, name: &ProcessName) {
        self.types.remove(name);
    }

    /// Sets the memory of every type.
    pub fn set_memory(&mut self, memory: ByteSize) {
        for scale in self.types.values_mut() {
            scale.memory = memory;
        }
    }

    /// The known type names, comma separated, for error messages.
    pub fn known(&self) -> String {
        self.types
            .keys()
            .map(ProcessName::as_str)
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The desired scale of `name`, if the type exists.
    pub fn get(&self, name: &ProcessName) -> Option<Scale> {
        self.types.get(name).copied()
    }

    /// Every type with its scale, in name order.
    pub fn iter(&self) -> impl Iterator<Item = (&ProcessName, Scale)> {
        self.types.iter().map(|(k, v)| (k, *v))
    }

    /// As events show it: type → `{"count": N, "memory": BYTES}`.
    pub fn to_json(&self) -> serde_json::Value {
        self.iter()
            .map(|(name, scale)| {
                let value =
                    serde_json::json!({ "count": scale.count, "memory": scale.memory.as_u64() });
                (name.to_string(), value)
            })
            .collect::<serde_json::Map<_, _>>()
            .into()
    }

    /// Total number of instances.
    pub fn total(&self) -> u64 {
        self.types.values().map(|s| u64::from(s.count)).sum()
    }
}

impl fmt::Display for Formation {
    /// Heroku's notation: `web=3, worker=2`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (name, scale)) in self.types.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{name}={}", scale.count)?;
        }
        Ok(())
    }
}

fn parse_count(name: &str, count: &str) -> Result<u32, String> {
    let shown = if name.is_empty() { "?" } else { name };
    if count.is_empty() {
        return Err(format!(
            "missing count for `{shown}`: expected a whole number ≥ 0, e.g. `{shown}=2`"
        ));
    }
    if !count.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!(
            "invalid count `{count}` for `{shown}`: expected a whole number ≥ 0"
        ));
    }
    match count.parse::<u32>() {
        Ok(n) if n <= MAX_COUNT => Ok(n),
        _ => Err(format!(
            "count `{count}` for `{shown}` is too large: at most {MAX_COUNT} instances per type"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::app::ProcessSpec;
    use std::path::PathBuf;

    fn app(names: &[&str]) -> AppSpec {
        AppSpec::new(
            PathBuf::from("/"),
            names
                .iter()
                .map(|n| {
                    ProcessSpec::new(
                        ProcessName::new(n).unwrap(),
                        PathBuf::from(format!("/{n}.wasm")),
                        vec![],
                        String::new(),
                    )
                })
                .collect(),
        )
    }

    fn scale(f: &Formation, changes: &[&str], memory: Option<&str>) -> Result<Formation, String> {
        let changes: Vec<String> = changes.iter().map(|s| s.to_string()).collect();
        f.with_changes(
            &changes,
            memory.map(|m| m.parse().unwrap()),
            ByteSize::mib(1024),
        )
    }

    #[test]
    fn heroku_scale_syntax() {
        let app = app(&["web", "worker", "clock"]);
        let f = Formation::default_for(&app, ByteSize::mib(256));
        let g = scale(&f, &["web=3", "worker+1", "clock=0"], None).unwrap();
        assert_eq!(counts(&g), "clock=0, web=3, worker=2");
        let g = scale(&g, &["web-2", "worker=1:512MiB"], None).unwrap();
        assert_eq!(counts(&g), "clock=0, web=1, worker=1");
        assert_eq!(
            g.get(&ProcessName::new("worker").unwrap()).unwrap().memory,
            ByteSize::mib(512)
        );
        assert_eq!(
            g.get(&ProcessName::new("web").unwrap()).unwrap().memory,
            ByteSize::mib(256)
        );
        let g = scale(&g, &["web=2"], Some("128MiB")).unwrap();
        assert_eq!(
            g.get(&ProcessName::new("web").unwrap()).unwrap().memory,
            ByteSize::mib(128)
        );
    }

    #[test]
    fn heroku_scale_rejects_bad_changes() {
        let app = app(&["web", "worker"]);
        let f = Formation::default_for(&app, ByteSize::mib(256));
        for (changes, needle) in [
            (&["web=-1"][..], "invalid count `-1` for `web`"),
            (&["web=abc"], "invalid count `abc` for `web`"),
            (&["web="], "missing count for `web`"),
            (&["=3"], "missing the process type"),
            (&["web=1.5"], "invalid count `1.5` for `web`"),
            (&["web=99999999999"], "too large"),
            (
                &["wrk=2"],
                "unknown process type `wrk` in `wrk=2`: known types are web, worker",
            ),
            (&["web=2", "wrk=1"], "unknown process type `wrk`"),
            (&["web-3"], "would scale `web` below 0 (it has 1)"),
            (&["web"], "expected `TYPE=N`"),
            (&["web+99999"], "too large"),
            (&["web+9999", "web+9999"], "more than 10000"),
            (&["web=1:12XB"], "invalid memory size `12XB`"),
            (&["web=1:2GiB"], "above this host's maximum of 1 GiB"),
            (&[], "nothing to scale"),
        ] {
            let err = scale(&f, changes, None).unwrap_err();
            assert!(err.contains(needle), "{changes:?}: {err}");
        }
    }

    proptest::proptest! {
        /// Any `-m` spec or scale change is applied or rejected whole; never a panic.
        #[test]
        fn arbitrary_changes_never_panic_or_half_apply(spec in "\\PC{0,40}", change in "[a-z=+:0-9MiBG .,-]{0,24}") {
            let app = app(&["web", "worker"]);
            let f = Formation::default_for(&app, ByteSize::mib(256));
            let mut g = f.clone();
            if g.apply_spec(&spec).is_err() {
                proptest::prop_assert_eq!(&g, &f);
            }
            let _ = f.with_changes(&[change], None, ByteSize::mib(1024));
        }

        /// A rejected `-m` spec is rejected for its first bad entry, with that entry's own
        /// message, which names the entry (or its type or count) as written.
        #[test]
        fn a_rejected_spec_names_its_first_bad_entry(
            entries in proptest::collection::vec(SPEC_ENTRY, 1..5),
            separators in proptest::collection::vec("[, ]{1,2}", 4),
            text in "\\PC{0,40}",
        ) {
            let spec: String = entries
                .iter()
                .zip(separators.iter().chain(std::iter::repeat(&String::new())))
                .flat_map(|(e, s)| [e.as_str(), s.as_str()])
                .collect();
            for spec in [spec, text] {
                let fresh = Formation::default_for(&app(&["web", "worker"]), ByteSize::mib(256));
                let Err(err) = fresh.clone().apply_spec(&spec) else { continue };
                // The parser's own split: commas and spaces, entries trimmed.
                let bad = spec
                    .split([',', ' '])
                    .map(str::trim)
                    .filter(|p| !p.is_empty())
                    .find(|part| fresh.clone().apply_spec(part).is_err());
                let bad = bad.unwrap_or_else(|| panic!("`{spec}` was refused ({err}) but no entry is bad"));
                proptest::prop_assert_eq!(&err, &fresh.clone().apply_spec(bad).unwrap_err());
                let (name, count) = bad.split_once('=').unwrap_or((bad, ""));
                proptest::prop_assert!(
                    names_one_of(&err, &[bad, name.trim(), count.trim()]),
                    "{} does not name `{}`", err, bad
                );
            }
        }

        /// A rejected scale command is rejected for its first bad change (after the ones before
        /// it applied), and the message names that change, or its type, count or size, as
        /// written.
        #[test]
        fn a_rejected_scale_names_its_first_bad_change(
            changes in proptest::collection::vec(SCALE_CHANGE, 1..5),
        ) {
            let f = Formation::default_for(&app(&["web", "my-worker"]), ByteSize::mib(256));
            let Err(err) = f.with_changes(&changes, None, ByteSize::mib(1024)) else {
                return Ok(());
            };
            let first_bad = (1..=changes.len())
                .find(|&n| f.with_changes(&changes[..n], None, ByteSize::mib(1024)).is_err())
                .expect("a prefix fails");
            let bad = &changes[first_bad - 1];
            let mut tokens = vec![bad.as_str()];
            for (i, _) in bad.match_indices(['=', '+', '-']) {
                let (name, value) = (&bad[..i], &bad[i + 1..]);
                let (count, size) = value.split_once(':').unwrap_or((value, ""));
                tokens.extend([name, value, count, size]);
            }
            proptest::prop_assert!(
                names_one_of(&err, &tokens),
                "{} does not name `{}`", err, bad
            );
        }

        #[test]
        fn sizes_and_durations_never_panic(text in "\\PC{0,24}", number in "[0-9.]{0,12}[a-zA-Z]{0,4}") {
            for input in [&text, &number] {
                let _ = input.parse::<ByteSize>();
                let _ = crate::app::parse_duration(input);
            }
        }

        /// Every size and duration parser names the value it refused, as written.
        #[test]
        fn rejected_sizes_and_durations_name_the_value(
            text in "\\PC{0,24}",
            number in " ?-?[0-9.]{0,12} ?[a-zA-Z]{0,4}",
        ) {
            for input in [&text, &number] {
                let quoted = format!("`{input}`");
                let parsers: [(&str, Parser); 5] = [
                    ("memory size", |s| s.parse::<ByteSize>().map(drop)),
                    ("duration", |s| crate::app::parse_duration(s).map(drop)),
                    ("capacity", |s| crate::app::parse_capacity(s).map(drop)),
                    ("http size", |s| crate::app::parse_http_size(s).map(drop)),
                    ("head size", |s| crate::app::parse_head_bytes(s).map(drop)),
                ];
                for (what, parse) in parsers {
                    if let Err(err) = parse(input) {
                        proptest::prop_assert!(
                            err.contains(&quoted),
                            "{} error for {:?} does not name it: {}", what, input, err
                        );
                    }
                }
            }
        }
    }

    /// A size or duration parser, its value dropped.
    type Parser = fn(&str) -> Result<(), String>;

    /// `-m` entries, valid and not: known, unknown and missing types, odd counts.
    const SPEC_ENTRY: &str = "(web|worker|all|wrk|we|)(=|==|)(-?[0-9]{0,12}|abc|1\\.5| 2)";

    /// Scale changes, valid and not, including sizes and a type name with a dash.
    const SCALE_CHANGE: &str =
        "(web|my-worker|my|wrk|)([=+-]|=-|)([0-9]{0,6}|x|1\\.5)(:[0-9]{0,5}(MiB|GiB|XB|)|)";

    /// Whether `message` quotes one of the non-empty `tokens` in backticks.
    fn names_one_of(message: &str, tokens: &[&str]) -> bool {
        tokens
            .iter()
            .any(|t| !t.is_empty() && message.contains(&format!("`{t}`")))
    }

    #[test]
    fn names_with_dashes() {
        let app = app(&["my-worker", "web"]);
        let f = Formation::default_for(&app, ByteSize::mib(256));
        let g = scale(&f, &["my-worker+2"], None).unwrap();
        let g = scale(&g, &["my-worker-1"], None).unwrap();
        assert_eq!(counts(&g), "my-worker=2, web=1");
    }

    fn counts(f: &Formation) -> String {
        f.to_string()
    }

    #[test]
    fn foreman_syntax() {
        let app = app(&["web", "worker", "clock"]);
        let mut f = Formation::default_for(&app, ByteSize::mib(256));
        assert_eq!(counts(&f), "clock=1, web=1, worker=1");
        f.apply_spec("web=3,worker=0").unwrap();
        assert_eq!(counts(&f), "clock=1, web=3, worker=0");
        f.apply_spec("web=2,all=0").unwrap();
        let mut sized = f.clone();
        sized.apply_spec("all=1:64MiB,web=3:1G").unwrap();
        let scale = |f: &Formation, name: &str| f.get(&ProcessName::new(name).unwrap()).unwrap();
        assert_eq!(
            scale(&sized, "web"),
            Scale {
                count: 3,
                memory: ByteSize::mib(1024)
            }
        );
        assert_eq!(
            scale(&sized, "clock"),
            Scale {
                count: 1,
                memory: ByteSize::mib(64)
            }
        );
        assert!(
            f.clone()
                .apply_spec("web=2:12XB")
                .unwrap_err()
                .contains("`web=2:12XB`: invalid memory size `12XB`")
        );
        assert_eq!(counts(&f), "clock=0, web=2, worker=0");
        assert_eq!(f.total(), 2);
    }

    #[test]
    fn rejects_bad_specs_without_changing_anything() {
        let app = app(&["web", "worker"]);
        let mut f = Formation::default_for(&app, ByteSize::mib(256));
        let before = f.clone();
        for (spec, needle) in [
            ("web=-1", "invalid count `-1` for `web`"),
            ("web=abc", "invalid count `abc` for `web`"),
            ("web=1.5", "invalid count `1.5` for `web`"),
            ("web=", "missing count for `web`"),
            ("=3", "missing the process type"),
            ("web=99999999999", "too large"),
            (
                "wrk=2",
                "unknown process type `wrk` in formation `wrk=2`: known types are web, worker",
            ),
            ("web=2,nope=1", "unknown process type `nope`"),
            ("web", "expected `TYPE=COUNT`"),
        ] {
            let err = f.apply_spec(spec).unwrap_err();
            assert!(err.contains(needle), "{spec}: {err}");
            assert_eq!(f, before, "{spec} changed the formation");
        }
    }
}
