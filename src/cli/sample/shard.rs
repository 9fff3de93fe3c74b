//! Which part of a run this process makes: `--shard I/N`, else what a scheduler says in the
//! environment. Shard I of N makes images `[I n / N, (I + 1) n / N)` (contiguous, rounded
//! down), each exactly as the whole run makes it, into its own folder `OUT/shard-I-of-N`;
//! `mcdm merge` puts the shards together.

use std::ops::Range;

use anyhow::{bail, Context, Result};

/// Shard `index` of `count`, and what said so.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Shard {
    pub index: usize,
    pub count: usize,
    /// `--shard`, or the environment variables it came from.
    pub from: String,
}

impl Shard {
    /// The images of this shard in a run of `n`.
    pub fn images(&self, n: usize) -> Range<usize> {
        // u128: n * count cannot overflow.
        let at = |i: usize| (n as u128 * i as u128 / self.count as u128) as usize;
        at(self.index)..at(self.index + 1)
    }

    /// The folder of this shard's images in `out`.
    pub fn folder(&self) -> String {
        format!("shard-{}-of-{}", self.index, self.count)
    }

    fn new(index: usize, count: usize, from: &str) -> Result<Shard> {
        if count == 0 || index >= count {
            bail!("{from}: shard {index} of {count} does not exist (shards are 0..{count})");
        }
        Ok(Shard {
            index,
            count,
            from: from.to_string(),
        })
    }
}

/// `I/N`.
fn parse_flag(text: &str) -> Result<Shard> {
    let parsed = text
        .split_once('/')
        .and_then(|(i, n)| Some((i.trim().parse().ok()?, n.trim().parse().ok()?)));
    let Some((index, count)) = parsed else {
        bail!("--shard {text}: expected I/N, shard I (from 0) of N");
    };
    Shard::new(index, count, "--shard")
}

/// The shard from `--shard`, else from the first of these the environment sets with more than
/// one process: `RANK` / `WORLD_SIZE` (torchrun), `SLURM_PROCID` / `SLURM_NTASKS` (an `srun`
/// step; a batch script has `SLURM_PROCID=0` too), a Slurm job array, `JOB_COMPLETION_INDEX` /
/// `--num-shards` (a Kubernetes Indexed Job, which sets no count). A job array's task is shard
/// `SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN` of `SLURM_ARRAY_TASK_COUNT`, or with
/// `--num-shards N` shard `SLURM_ARRAY_TASK_ID` of N, which stays right when one task is
/// resubmitted alone (`sbatch --array=3`). None: the whole run. A shard of one is the whole
/// run too.
pub(crate) fn find(
    flag: Option<&str>,
    num_shards: Option<usize>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Option<Shard>> {
    let number = |name: &str| -> Result<Option<usize>> {
        env(name)
            .map(|v| {
                v.trim()
                    .parse::<usize>()
                    .with_context(|| format!("{name}={v}: expected a non-negative integer"))
            })
            .transpose()
    };
    // An (index, count) pair of the environment, when it says there are several processes.
    let several = |index: &str, count: &str| -> Result<Option<(usize, usize)>> {
        Ok(match (number(index)?, number(count)?) {
            (Some(i), Some(n)) if n > 1 => Some((i, n)),
            _ => None,
        })
    };
    let shard = if let Some(text) = flag {
        Some(parse_flag(text)?)
    } else if let Some((i, n)) = several("RANK", "WORLD_SIZE")? {
        Some(Shard::new(i, n, "RANK/WORLD_SIZE")?)
    } else if let Some((i, n)) = several("SLURM_PROCID", "SLURM_NTASKS")? {
        Some(Shard::new(i, n, "SLURM_PROCID/SLURM_NTASKS")?)
    } else if let (Some(id), Some(n)) = (
        number("SLURM_ARRAY_TASK_ID")?,
        number("SLURM_ARRAY_TASK_COUNT")?,
    ) {
        match num_shards {
            Some(count) => Some(Shard::new(id, count, "SLURM_ARRAY_TASK_ID/--num-shards")?),
            None => {
                let min = number("SLURM_ARRAY_TASK_MIN")?.unwrap_or(0);
                let from = "SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN / SLURM_ARRAY_TASK_COUNT";
                let Some(index) = id.checked_sub(min) else {
                    bail!("{from}: task {id} is below the array's first task {min}");
                };
                Some(Shard::new(index, n, from)?)
            }
        }
    } else if let Some(i) = number("JOB_COMPLETION_INDEX")? {
        let Some(n) = num_shards else {
            bail!(
                "JOB_COMPLETION_INDEX={i} (a Kubernetes Indexed Job) gives this shard's index \
                 but not the number of shards: give --num-shards (the Job's completions)"
            );
        };
        Some(Shard::new(i, n, "JOB_COMPLETION_INDEX/--num-shards")?)
    } else {
        if let Some(n) = num_shards {
            bail!(
                "--num-shards {n} without JOB_COMPLETION_INDEX or a Slurm job array: give \
                 --shard I/{n}"
            );
        }
        None
    };
    if let (Some(s), Some(n)) = (&shard, num_shards) {
        if s.count != n {
            bail!(
                "--num-shards {n} disagrees with {} (shard {} of {})",
                s.from,
                s.index,
                s.count
            );
        }
    }
    Ok(shard.filter(|s| s.count > 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |name| {
            vars.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.to_string())
        }
    }

    #[test]
    fn shards_cover_the_run_once() {
        for (n, count) in [(10, 3), (3, 4), (1000, 7), (5, 5)] {
            let mut next = 0;
            for index in 0..count {
                let s = Shard::new(index, count, "test").unwrap();
                let r = s.images(n);
                assert_eq!(r.start, next, "{n} / {count}");
                next = r.end;
            }
            assert_eq!(next, n);
        }
        assert_eq!(Shard::new(1, 3, "t").unwrap().images(10), 3..6);
    }

    #[test]
    fn the_first_source_found_wins() {
        let found = |flag, shards, vars: &[(&str, &str)]| {
            find(flag, shards, &env(vars)).map(|s| s.map(|s| (s.index, s.count, s.from)))
        };
        let slurm = [("SLURM_PROCID", "2"), ("SLURM_NTASKS", "4")];
        assert_eq!(
            found(None, None, &slurm).unwrap(),
            Some((2, 4, "SLURM_PROCID/SLURM_NTASKS".into()))
        );
        assert_eq!(
            found(Some("1/4"), None, &slurm).unwrap(),
            Some((1, 4, "--shard".into()))
        );
        let array = [
            ("SLURM_ARRAY_TASK_ID", "12"),
            ("SLURM_ARRAY_TASK_MIN", "10"),
            ("SLURM_ARRAY_TASK_COUNT", "4"),
        ];
        assert_eq!(found(None, None, &array).unwrap().unwrap().0, 2);
        // A batch script's SLURM_PROCID=0 (with SLURM_NTASKS=1) does not hide the array.
        let task = [&array[..], &[("SLURM_PROCID", "0"), ("SLURM_NTASKS", "1")]].concat();
        assert_eq!(found(None, None, &task).unwrap().unwrap().0, 2);
        // With --num-shards the task id is the index: task 3 resubmitted alone is shard 3.
        let alone = [
            ("SLURM_ARRAY_TASK_ID", "3"),
            ("SLURM_ARRAY_TASK_MIN", "3"),
            ("SLURM_ARRAY_TASK_COUNT", "1"),
        ];
        assert_eq!(
            found(None, Some(4), &alone).unwrap(),
            Some((3, 4, "SLURM_ARRAY_TASK_ID/--num-shards".into()))
        );
        assert_eq!(found(None, None, &alone).unwrap(), None);
        let torch = [("RANK", "1"), ("WORLD_SIZE", "2"), ("SLURM_PROCID", "0")];
        assert_eq!(
            found(None, None, &torch).unwrap().unwrap().2,
            "RANK/WORLD_SIZE"
        );
        let k8s = [("JOB_COMPLETION_INDEX", "3")];
        assert_eq!(found(None, Some(5), &k8s).unwrap().unwrap().0, 3);
        // One shard is the whole run; none found is too.
        assert_eq!(found(Some("0/1"), None, &[]).unwrap(), None);
        assert_eq!(found(None, None, &[]).unwrap(), None);
    }

    #[test]
    fn bad_shards_are_named() {
        let fails = |flag, shards, vars: &[(&str, &str)], needle: &str| {
            let err = find(flag, shards, &env(vars)).unwrap_err();
            assert!(format!("{err:#}").contains(needle), "{err:#}");
        };
        fails(
            Some("4/4"),
            None,
            &[],
            "--shard: shard 4 of 4 does not exist",
        );
        fails(Some("1-4"), None, &[], "--shard 1-4: expected I/N");
        fails(Some("0/0"), None, &[], "shard 0 of 0 does not exist");
        fails(None, None, &[("RANK", "x"), ("WORLD_SIZE", "2")], "RANK=x");
        fails(
            None,
            None,
            &[("JOB_COMPLETION_INDEX", "1")],
            "give --num-shards",
        );
        fails(
            None,
            Some(3),
            &[],
            "--num-shards 3 without JOB_COMPLETION_INDEX or a Slurm job array",
        );
        fails(
            Some("1/4"),
            Some(3),
            &[],
            "--num-shards 3 disagrees with --shard",
        );
        fails(
            None,
            None,
            &[
                ("SLURM_ARRAY_TASK_ID", "1"),
                ("SLURM_ARRAY_TASK_MIN", "2"),
                ("SLURM_ARRAY_TASK_COUNT", "4"),
            ],
            "task 1 is below the array's first task 2",
        );
    }
}
