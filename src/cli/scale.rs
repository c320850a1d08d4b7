//! `wasmform scale` (also `ps:scale`): change the running formation, in the words of Heroku,
//! Convox, Fly.io, Cloud Foundry or dotCloud. Every form is translated here into Heroku's
//! changes (`web=2:512MiB`, `web+0:1GiB`), which the control API applies atomically.

use anyhow::Result;
use hyper::Method;

use super::client::{AppArgs, Client, block_on, print_formation};

/// Scale process types of the running app.
///
/// Only the named types change. New instances start at once; surplus ones (highest number
/// first) stop taking requests, finish the ones in flight, then stop. A memory change replaces
/// instances one at a time, each new one up before an old one stops. Bare memory numbers are
/// MiB.
#[derive(clap::Args, Debug)]
#[command(after_help = EXAMPLES)]
pub struct ScaleCommand {
    /// Changes: `TYPE=N`, `TYPE+N`, `TYPE-N`, optionally `:SIZE` (Heroku); `TYPE:instances=N`,
    /// `TYPE:memory=SIZE` (dotCloud); `count TYPE=N…` or `memory SIZE -g TYPE` (Fly.io); or
    /// one `TYPE` with `--count`/`--memory` (Convox).
    #[arg(value_name = "CHANGES")]
    changes: Vec<String>,

    /// Memory limit for the named types, unless a change gives its own `:SIZE` (Cloud
    /// Foundry's `-m 1G`, Convox's `--memory 512`).
    #[arg(long = "memory", short = 'm', value_name = "SIZE")]
    memory: Option<String>,

    /// Instances of the one type named (Convox: `scale web --count 2`).
    #[arg(long = "count", value_name = "N")]
    count: Option<String>,

    /// The type to scale (Cloud Foundry: `scale --process web -i 2 -m 1G`).
    #[arg(long = "process", value_name = "TYPE")]
    process: Option<String>,

    /// Instances of `--process` (Cloud Foundry).
    #[arg(short = 'i', long = "instances", value_name = "N")]
    instances: Option<String>,

    /// Cloud Foundry's disk limit: refused, instances have no disk.
    #[arg(short = 'k', long = "disk", value_name = "SIZE")]
    disk: Option<String>,

    /// The type of Fly.io's `scale count N` or `scale memory SIZE`.
    #[arg(short = 'g', long = "process-group", value_name = "TYPE")]
    group: Option<String>,

    #[command(flatten)]
    app: AppArgs,
}

const EXAMPLES: &str = "\
Examples, one per platform (each is the same change as its Heroku form):
  wasmform scale web=2 worker+1 web=2:512MiB     Heroku (also `wasmform ps:scale …`)
  wasmform scale web --count 2 --memory 512      Convox
  wasmform scale count web=8 cron=2              Fly.io (also `scale memory 4096 -g web`)
  wasmform scale --process web -i 2 -m 1G        Cloud Foundry
  wasmform scale www:instances=3 www:memory=512M dotCloud";

impl ScaleCommand {
    /// Sends the change and prints the whole formation.
    pub fn execute(self) -> Result<()> {
        let request = Grammar {
            changes: &self.changes,
            memory: self.memory.as_deref(),
            count: self.count.as_deref(),
            process: self.process.as_deref(),
            instances: self.instances.as_deref(),
            disk: self.disk.as_deref(),
            group: self.group.as_deref(),
        }
        .translate()
        .map_err(|e| anyhow::anyhow!("{e}\n\n{EXAMPLES}"))?;
        let client = Client::new(&self.app)?;
        let body = serde_json::json!({ "changes": request.changes, "memory": request.memory });
        let answer = block_on(client.json(Method::POST, "/v1/scale", Some(body)))??;
        print_formation(&answer);
        Ok(())
    }
}

/// What was typed, in any platform's grammar.
#[derive(Clone, Copy, Debug, Default)]
struct Grammar<'a> {
    changes: &'a [String],
    memory: Option<&'a str>,
    count: Option<&'a str>,
    process: Option<&'a str>,
    instances: Option<&'a str>,
    disk: Option<&'a str>,
    group: Option<&'a str>,
}

/// The same change in Heroku's words, as the control API takes it.
#[derive(Debug, PartialEq, Eq)]
struct Request {
    changes: Vec<String>,
    /// `--memory` for every named change without its own `:SIZE`.
    memory: Option<String>,
}

impl Grammar<'_> {
    fn translate(&self) -> Result<Request, String> {
        if let Some(disk) = self.disk {
            return Err(format!(
                "`-k {disk}`: instances have no disk (wasmform grants no filesystem), so there is no disk limit to set; leave out `-k`"
            ));
        }
        if self.process.is_some() || self.instances.is_some() {
            return self.cloud_foundry();
        }
        match self.changes.first().map(String::as_str) {
            Some("count") if self.count.is_none() => return self.fly_count(),
            Some("memory") if self.count.is_none() => return self.fly_memory(),
            _ => {}
        }
        if let Some(group) = self.group {
            return Err(format!(
                "`-g {group}` goes with Fly.io's `scale count N -g {group}` or `scale memory SIZE -g {group}`"
            ));
        }
        let bare = |c: &String| !c.contains(['=', '+', '-', ':']);
        match (self.changes, self.count) {
            // Convox: one type, then `--count` and/or `--memory`.
            ([name], count) if bare(name) && (count.is_some() || self.memory.is_some()) => {
                Ok(Request {
                    changes: vec![change(name, count, self.memory, "--count")?],
                    memory: None,
                })
            }
            ([], Some(count)) => Err(format!(
                "`--count {count}` needs the process type: `scale web --count {count}` (Convox)"
            )),
            (_, Some(count)) => Err(format!(
                "`--count {count}` takes one process type and no other change (Convox: `scale web --count {count}`); \
                 several types at once are `scale web={count} worker=1` (Heroku)"
            )),
            ([], None) => {
                Err("nothing to scale: give changes like `web=3`, `worker+1` or `clock=0`".into())
            }
            (changes, None) => Ok(Request {
                changes: changes
                    .iter()
                    .map(|c| dotcloud(c))
                    .collect::<Result<_, _>>()?,
                memory: self.memory.map(str::to_string),
            }),
        }
    }

    /// `scale --process web -i 2 -m 1G`.
    fn cloud_foundry(&self) -> Result<Request, String> {
        let Some(process) = self.process else {
            let n = self.instances.unwrap_or_default();
            return Err(format!(
                "`-i {n}` needs the process type: `scale --process web -i {n}` (Cloud Foundry)"
            ));
        };
        if !self.changes.is_empty() || self.count.is_some() || self.group.is_some() {
            return Err(format!(
                "`--process {process}` takes only `-i N` and `-m SIZE` (Cloud Foundry); other changes go in one of the other forms"
            ));
        }
        if self.instances.is_none() && self.memory.is_none() {
            return Err(format!(
                "`--process {process}` needs `-i N` or `-m SIZE`: `scale --process {process} -i 2 -m 1G` (Cloud Foundry)"
            ));
        }
        Ok(Request {
            changes: vec![change(process, self.instances, self.memory, "-i")?],
            memory: None,
        })
    }

    /// `scale count web=8 cron=2`, or `scale count 8 -g web`.
    fn fly_count(&self) -> Result<Request, String> {
        if self.memory.is_some() {
            return Err(
                "`scale count` sets counts only; memory is `scale memory SIZE -g TYPE` (Fly.io)"
                    .into(),
            );
        }
        let rest = &self.changes[1..];
        let changes = match (rest, self.group) {
            ([n], Some(group)) => vec![change(group, Some(n), None, "scale count")?],
            (_, Some(group)) => {
                return Err(format!(
                    "`scale count N -g {group}` takes one count (Fly.io), e.g. `scale count 2 -g {group}`"
                ));
            }
            ([], None) => {
                return Err(
                    "`scale count` needs `TYPE=N` pairs: `scale count web=8 cron=2` (Fly.io)"
                        .into(),
                );
            }
            (pairs, None) => {
                if let Some(pair) = pairs
                    .iter()
                    .find(|p| !p.contains('=') || p.contains(['+', ':']))
                {
                    return Err(format!(
                        "`{pair}` in `scale count`: expected `TYPE=N` pairs, e.g. `scale count web=8 cron=2` (Fly.io)"
                    ));
                }
                pairs.to_vec()
            }
        };
        Ok(Request {
            changes,
            memory: None,
        })
    }

    /// `scale memory 4096 -g web`.
    fn fly_memory(&self) -> Result<Request, String> {
        match (&self.changes[1..], self.group) {
            ([size], Some(group)) if self.memory.is_none() => Ok(Request {
                changes: vec![change(group, None, Some(size), "")?],
                memory: None,
            }),
            ([size], None) => Err(format!(
                "`scale memory {size}` needs the process group: `scale memory {size} -g web` (Fly.io)"
            )),
            _ => Err("`scale memory` takes one size and a process group: `scale memory 4096 -g web` (Fly.io)".into()),
        }
    }
}

/// `name=count:memory` (or `name+0:memory` to keep the count), checking the count here so the
/// error names the form it was given in (`flag`).
fn change(
    name: &str,
    count: Option<&str>,
    memory: Option<&str>,
    flag: &str,
) -> Result<String, String> {
    let mut change = name.to_string();
    match count {
        Some(n) if n.parse::<u32>().is_ok() => change += &format!("={n}"),
        Some(n) => {
            return Err(format!(
                "invalid instance count `{n}` in `{flag} {n}` for `{name}`: expected a whole number ≥ 0"
            ));
        }
        None => change += "+0",
    }
    if let Some(memory) = memory {
        change += &format!(":{memory}");
    }
    Ok(change)
}

/// dotCloud's `www:instances=3` and `www:memory=512M`; anything else is Heroku's and passes
/// (`web=2:512MiB`, `web-1:1G`: a size never holds `=`).
fn dotcloud(change: &str) -> Result<String, String> {
    let Some((name, (key, value))) = change
        .split_once(':')
        .filter(|(name, _)| !name.contains(['=', '+']))
        .and_then(|(name, setting)| Some((name, setting.split_once('=')?)))
    else {
        return Ok(change.to_string());
    };
    match key {
        "instances" if value.parse::<u32>().is_ok() => Ok(format!("{name}={value}")),
        "instances" => Err(format!(
            "invalid instance count `{value}` in `{change}`: expected a whole number ≥ 0, e.g. `{name}:instances=3`"
        )),
        "memory" => Ok(format!("{name}+0:{value}")),
        _ => Err(format!(
            "invalid change `{change}`: dotCloud's forms are `{name}:instances=N` and `{name}:memory=SIZE`, Heroku's `{name}=N:SIZE`"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    fn heroku(changes: &[&str], memory: Option<&str>) -> Request {
        Request {
            changes: strings(changes),
            memory: memory.map(str::to_string),
        }
    }

    #[test]
    fn every_platform_says_the_same_change() {
        let cases: &[(Grammar<'_>, Request)] = &[
            (
                Grammar {
                    changes: &strings(&["web=2", "worker+1"]),
                    memory: Some("256"),
                    ..Grammar::default()
                },
                heroku(&["web=2", "worker+1"], Some("256")),
            ),
            (
                Grammar {
                    changes: &strings(&["web"]),
                    count: Some("2"),
                    memory: Some("512"),
                    ..Grammar::default()
                },
                heroku(&["web=2:512"], None),
            ),
            (
                Grammar {
                    changes: &strings(&["web"]),
                    memory: Some("96MiB"),
                    ..Grammar::default()
                },
                heroku(&["web+0:96MiB"], None),
            ),
            (
                Grammar {
                    changes: &strings(&["count", "web=8", "cron=2"]),
                    ..Grammar::default()
                },
                heroku(&["web=8", "cron=2"], None),
            ),
            (
                Grammar {
                    changes: &strings(&["count", "3"]),
                    group: Some("web"),
                    ..Grammar::default()
                },
                heroku(&["web=3"], None),
            ),
            (
                Grammar {
                    changes: &strings(&["memory", "4096"]),
                    group: Some("web"),
                    ..Grammar::default()
                },
                heroku(&["web+0:4096"], None),
            ),
            (
                Grammar {
                    process: Some("web"),
                    instances: Some("2"),
                    memory: Some("1G"),
                    ..Grammar::default()
                },
                heroku(&["web=2:1G"], None),
            ),
            (
                Grammar {
                    changes: &strings(&["www:instances=3", "www:memory=512M", "www=1"]),
                    ..Grammar::default()
                },
                heroku(&["www=3", "www+0:512M", "www=1"], None),
            ),
            (
                Grammar {
                    changes: &strings(&[
                        "web=2:512MiB",
                        "my-worker-1",
                        "my-worker-1:1G",
                        "my-worker:instances=2",
                    ]),
                    ..Grammar::default()
                },
                heroku(
                    &[
                        "web=2:512MiB",
                        "my-worker-1",
                        "my-worker-1:1G",
                        "my-worker=2",
                    ],
                    None,
                ),
            ),
        ];
        for (grammar, expected) in cases {
            assert_eq!(grammar.translate().as_ref(), Ok(expected), "{grammar:?}");
        }
    }

    #[test]
    fn malformed_and_ambiguous_forms_name_the_value() {
        let cases: &[(Grammar<'_>, &str)] = &[
            (
                Grammar {
                    count: Some("2"),
                    ..Grammar::default()
                },
                "`--count 2` needs the process type",
            ),
            (
                Grammar {
                    instances: Some("2"),
                    ..Grammar::default()
                },
                "`-i 2` needs the process type: `scale --process web -i 2`",
            ),
            (
                Grammar {
                    changes: &strings(&["web:instances=x"]),
                    ..Grammar::default()
                },
                "invalid instance count `x` in `web:instances=x`",
            ),
            (
                Grammar {
                    changes: &strings(&["count"]),
                    ..Grammar::default()
                },
                "`scale count` needs `TYPE=N` pairs",
            ),
            (
                Grammar {
                    changes: &strings(&["web"]),
                    count: Some("two"),
                    ..Grammar::default()
                },
                "invalid instance count `two` in `--count two` for `web`",
            ),
            (
                Grammar {
                    process: Some("web"),
                    disk: Some("1G"),
                    ..Grammar::default()
                },
                "`-k 1G`: instances have no disk",
            ),
            (
                Grammar {
                    changes: &strings(&["web=2"]),
                    process: Some("web"),
                    instances: Some("2"),
                    ..Grammar::default()
                },
                "`--process web` takes only `-i N` and `-m SIZE`",
            ),
            (
                Grammar {
                    changes: &strings(&["web=2", "worker"]),
                    count: Some("2"),
                    ..Grammar::default()
                },
                "`--count 2` takes one process type",
            ),
            (
                Grammar {
                    changes: &strings(&["memory", "4096"]),
                    ..Grammar::default()
                },
                "`scale memory 4096` needs the process group",
            ),
            (
                Grammar {
                    changes: &strings(&["web=2"]),
                    group: Some("web"),
                    ..Grammar::default()
                },
                "`-g web` goes with Fly.io's",
            ),
            (
                Grammar {
                    changes: &strings(&["web:disk=1G"]),
                    ..Grammar::default()
                },
                "invalid change `web:disk=1G`: dotCloud's forms are",
            ),
        ];
        for (grammar, expected) in cases {
            let error = grammar.translate().unwrap_err();
            assert!(error.contains(expected), "{grammar:?}: {error}");
        }
    }
}
