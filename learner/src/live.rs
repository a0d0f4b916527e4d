//! A running VM's transitions, read as they arrive in its state repository (`vmm run
//! --state-db DB`), for `vmm-learn online`.
//!
//! The repository is checked with `tuner::state_repo::StateRepo::open_read_only` (a
//! regular SQLite file with the repository's tables and a known layout) and then read
//! through a read-only connection of its own ([`tuner::state_repo::open_sqlite_read_only`]:
//! through the live writer's WAL, never writing). Each [`LiveRows::poll`] reads at most
//! [`MAX_ROWS_PER_POLL`] rows after the last one consumed, in insertion order.
//!
//! Rows mean what they mean offline ([`crate::dataset`]): row `t` holds `s_t`, the action
//! chosen after it and, once the next interval is over, its reward; rows `t`, `t+1` of one
//! VM give `(s_t, a_t, r_t, s_{t+1})`. The monitor writes the action and reward of a row
//! after the row itself (an update one interval later), so a row is consumed only when
//! its successor is there and its outcome is known; a row whose outcome is still missing
//! when two more rows of the VM have arrived is skipped for good (the outcome was dropped).
//! A gap of more than [`MAX_GAP_FACTOR`] intervals between two rows (the VM was paused,
//! rows were lost) ends the transition there. Rows that fail a check (schema version,
//! vector length, non-finite values) are counted and skipped, never learned from.

use std::path::{Path, PathBuf};

use rusqlite::{params, Connection};
use tuner::reward::RewardWeights;
use tuner::schema::{Schema, SCHEMA_VERSION};

use crate::dataset::parse_config;
use crate::error::LearnError;
use tuner::actions::VmShape;

/// Rows read at most per poll (the rest waits for the next one).
pub const MAX_ROWS_PER_POLL: usize = 4096;
/// A next row later than this many intervals does not continue the episode.
pub const MAX_GAP_FACTOR: f64 = 2.5;

/// One row as read from the repository.
#[derive(Debug, Clone, PartialEq)]
pub struct LiveRow {
    /// `samples.id`.
    pub id: i64,
    /// The VM.
    pub vm_id: String,
    /// Monitor time of the sample.
    pub ts_ns: i64,
    /// Length of its interval.
    pub interval_ns: i64,
    /// The normalised vector (checked: schema length, finite).
    pub state: Vec<f32>,
    /// The action label stored after it, once known.
    pub action: Option<String>,
    /// The reward of the interval after it, once known (finite).
    pub reward: Option<f64>,
    /// The policy in charge when the row was written.
    pub policy_id: String,
    /// The VM's configuration JSON.
    pub config: String,
}

/// A transition ready for [`crate::online::OnlineLearner::push_labelled`].
#[derive(Debug, Clone, PartialEq)]
pub struct LabelledTransition {
    /// `s_t`.
    pub state: Vec<f32>,
    /// The stored action label of `t`.
    pub label: String,
    /// `r_t`.
    pub reward: f64,
    /// `s_{t+1}`.
    pub next_state: Vec<f32>,
    /// The policy that chose `a_t`.
    pub policy_id: String,
}

/// What the VM's rows say about it: its shape (vCPUs, drives, network devices: its
/// action space) and reward weights.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LiveVm {
    /// Its vCPUs, drives and network devices.
    pub shape: VmShape,
    /// The reward weights its rows were scored with (recorded, or the defaults).
    pub weights: RewardWeights,
}

/// Counts of a [`LiveRows`].
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct LiveStats {
    /// Rows of the VM consumed.
    pub rows: u64,
    /// Transitions made.
    pub transitions: u64,
    /// Rows skipped: no outcome stored, a gap after them, or a failed check.
    pub skipped: u64,
    /// Rows that failed a check.
    pub invalid: u64,
}

/// Follows the rows of one VM in a state repository.
pub struct LiveRows {
    path: PathBuf,
    conn: Connection,
    /// Rows with a larger id are new.
    cursor: i64,
    vm_id: Option<String>,
    stats: LiveStats,
}

impl std::fmt::Debug for LiveRows {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LiveRows")
            .field("path", &self.path)
            .field("cursor", &self.cursor)
            .field("vm_id", &self.vm_id)
            .finish_non_exhaustive()
    }
}

fn sql(path: &Path) -> impl Fn(rusqlite::Error) -> LearnError + '_ {
    move |e| LearnError::Sqlite {
        path: path.to_path_buf(),
        message: e.to_string(),
    }
}

impl LiveRows {
    /// Opens the repository at `path` read-only and starts after its last row: only rows
    /// written from now on are learned from. `vm_id`: the VM to follow; `None` follows
    /// the VM of the first new row.
    pub fn open(path: &Path, vm_id: Option<String>) -> Result<LiveRows, LearnError> {
        if !path.exists() {
            return Err(LearnError::DbMissing {
                path: path.to_path_buf(),
            });
        }
        // The repository's own check: a regular file, SQLite, the repository's tables.
        tuner::state_repo::StateRepo::open_read_only(path).map_err(|e| {
            LearnError::NotADatabase {
                path: path.to_path_buf(),
                message: format!("not a VM's state repository: {e}"),
            }
        })?;
        let conn = tuner::state_repo::open_sqlite_read_only(path).map_err(sql(path))?;
        let cursor: i64 = conn
            .query_row("SELECT coalesce(max(id), 0) FROM samples", [], |r| r.get(0))
            .map_err(sql(path))?;
        Ok(LiveRows {
            path: path.to_path_buf(),
            conn,
            cursor,
            vm_id,
            stats: LiveStats::default(),
        })
    }

    /// The VM followed (once known).
    pub fn vm_id(&self) -> Option<&str> {
        self.vm_id.as_deref()
    }

    /// Counts so far.
    pub fn stats(&self) -> LiveStats {
        self.stats
    }

    /// Reads the new rows (at most [`MAX_ROWS_PER_POLL`]) of the VM followed and returns
    /// the transitions they complete, plus the newest row read (for its configuration).
    pub fn poll(&mut self) -> Result<(Vec<LabelledTransition>, Option<LiveRow>), LearnError> {
        let rows = self.read_new()?;
        let newest = rows.last().cloned();
        let mut out = Vec::new();
        let mut i = 0;
        while i + 1 < rows.len() {
            let (row, next) = (&rows[i], &rows[i + 1]);
            let gap_ok =
                (next.ts_ns - row.ts_ns) as f64 <= MAX_GAP_FACTOR * (row.interval_ns.max(1) as f64);
            match (&row.action, row.reward) {
                (Some(label), Some(reward)) if gap_ok => {
                    out.push(LabelledTransition {
                        state: row.state.clone(),
                        label: label.clone(),
                        reward,
                        next_state: next.state.clone(),
                        policy_id: row.policy_id.clone(),
                    });
                    self.stats.transitions += 1;
                }
                (Some(_), Some(_)) => self.stats.skipped += 1,
                // The outcome may still come: wait while this is one of the last two rows.
                _ if i + 2 >= rows.len() => break,
                _ => self.stats.skipped += 1,
            }
            self.stats.rows += 1;
            self.cursor = row.id;
            i += 1;
        }
        Ok((out, newest))
    }

    /// The VM's rows after the cursor, checked; rows failing a check are skipped (and
    /// the cursor moves past them).
    fn read_new(&mut self) -> Result<Vec<LiveRow>, LearnError> {
        let path = self.path.clone();
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT id, vm_id, ts_ns, interval_ns, schema_version, vector, action, reward, \
                 policy_id, config FROM samples WHERE id > ?1 AND (?2 IS NULL OR vm_id = ?2) \
                 ORDER BY id LIMIT ?3",
            )
            .map_err(sql(&path))?;
        let mut rows = stmt
            .query(params![
                self.cursor,
                self.vm_id,
                i64::try_from(MAX_ROWS_PER_POLL).unwrap_or(i64::MAX)
            ])
            .map_err(sql(&path))?;
        let mut out: Vec<LiveRow> = Vec::new();
        let mut invalid = 0u64;
        let mut vm_id = self.vm_id.clone();
        while let Some(r) = rows.next().map_err(sql(&path))? {
            let id: i64 = r.get(0).map_err(sql(&path))?;
            let row_vm: String = r.get(1).map_err(sql(&path))?;
            match &vm_id {
                Some(v) if *v != row_vm => continue,
                Some(_) => {}
                None => {
                    log::info!("following VM {row_vm:?} (the first new row's)");
                    vm_id = Some(row_vm.clone());
                }
            }
            match check(r, id, row_vm) {
                Ok(row) => out.push(row),
                Err(why) => {
                    log::warn!("row id {id} skipped: {why}");
                    invalid += 1;
                    // Nothing before it is pending only if it comes first.
                    if out.is_empty() {
                        self.cursor = id;
                    }
                }
            }
        }
        self.vm_id = vm_id;
        self.stats.invalid += invalid;
        self.stats.skipped += invalid;
        Ok(out)
    }

    /// The shape, reward weights and vCPUs of the VM from a row's configuration.
    pub fn shape_of(row: &LiveRow) -> Result<LiveVm, LearnError> {
        let (shape, weights) =
            parse_config(&row.config).map_err(|message| LearnError::BadConfig {
                row_id: row.id,
                vm_id: row.vm_id.clone(),
                message,
            })?;
        Ok(LiveVm {
            shape,
            weights: weights.unwrap_or_default(),
        })
    }
}

/// Reads and checks one row; `Err` with the reason.
fn check(r: &rusqlite::Row<'_>, id: i64, vm_id: String) -> Result<LiveRow, String> {
    let col = |c: &str, e: rusqlite::Error| format!("column {c}: {e}");
    let schema_version: i64 = r.get(4).map_err(|e| col("schema_version", e))?;
    if schema_version != i64::from(SCHEMA_VERSION) {
        return Err(format!(
            "schema version {schema_version}, this build needs {SCHEMA_VERSION}"
        ));
    }
    let blob: Vec<u8> = r.get(5).map_err(|e| col("vector", e))?;
    let state = tuner::state_repo::decode_vector(&blob).map_err(|e| e.to_string())?;
    if state.len() != Schema::len() {
        return Err(format!(
            "vector has {} values, the schema has {}",
            state.len(),
            Schema::len()
        ));
    }
    if let Some(i) = state.iter().position(|x| !x.is_finite()) {
        return Err(format!("vector[{i}] is {}", state[i]));
    }
    let reward: Option<f64> = r.get(7).map_err(|e| col("reward", e))?;
    if let Some(x) = reward.filter(|x| !x.is_finite()) {
        return Err(format!("reward is {x}"));
    }
    Ok(LiveRow {
        id,
        vm_id,
        ts_ns: r.get(2).map_err(|e| col("ts_ns", e))?,
        interval_ns: r.get(3).map_err(|e| col("interval_ns", e))?,
        state,
        action: r.get(6).map_err(|e| col("action", e))?,
        reward,
        policy_id: r.get(8).map_err(|e| col("policy_id", e))?,
        config: r.get(9).map_err(|e| col("config", e))?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tuner::state_repo::{RepoConfig, Row, StateRepo};

    fn row(ts: u64, action: Option<&str>, reward: Option<f64>) -> Row {
        Row {
            vm_id: "vm".into(),
            ts_ns: ts,
            interval_ns: 100,
            schema_version: SCHEMA_VERSION,
            vector: vec![0.5; Schema::len()],
            raw: vec![0.0; Schema::len()],
            action: action.map(str::to_string),
            reward,
            policy_id: "threshold".into(),
            config: r#"{"vcpus":2,"drives":[{}],"network":[]}"#.into(),
            anomaly: None,
            anomaly_score: None,
            slo: None,
        }
    }

    #[test]
    fn follows_new_rows_and_waits_for_outcomes() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("s.db");
        let repo = StateRepo::open(&db, RepoConfig::default()).unwrap();
        let w = repo.writer();
        // A row from before: not learned from.
        w.insert_blocking(row(0, Some("noop"), Some(1.0))).unwrap();
        repo.flush().unwrap();
        let mut live = LiveRows::open(&db, None).unwrap();
        w.insert_blocking(row(1000, Some("noop"), Some(0.5)))
            .unwrap();
        w.insert_blocking(row(1100, Some("vcpu-1"), None)).unwrap();
        repo.flush().unwrap();
        let (t, newest) = live.poll().unwrap();
        assert_eq!(t.len(), 1);
        assert_eq!((t[0].label.as_str(), t[0].reward), ("noop", 0.5));
        assert_eq!(newest.unwrap().ts_ns, 1100);
        assert_eq!(live.vm_id(), Some("vm"));
        let shape = LiveRows::shape_of(&live.read_new_for_test()).unwrap();
        assert_eq!((shape.shape.drives, shape.shape.vcpus), (1, 2));
        // The outcome of 1100 arrives with the next row; a gap breaks the next one.
        w.record_outcome("vm", 1100, Some("vcpu-1".into()), Some(-0.25))
            .unwrap();
        w.insert_blocking(row(1200, Some("noop"), Some(0.1)))
            .unwrap();
        w.insert_blocking(row(9000, None, None)).unwrap();
        w.insert_blocking(row(9100, None, None)).unwrap();
        repo.flush().unwrap();
        let (t, _) = live.poll().unwrap();
        assert_eq!(t.len(), 1, "{t:?}");
        assert_eq!((t[0].label.as_str(), t[0].reward), ("vcpu-1", -0.25));
        let s = live.stats();
        assert_eq!((s.transitions, s.skipped), (2, 1), "{s:?}");
    }

    impl LiveRows {
        fn read_new_for_test(&mut self) -> LiveRow {
            self.read_new().unwrap().pop().unwrap()
        }
    }

    #[test]
    fn refuses_what_is_not_a_repository() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("none.db");
        assert!(matches!(
            LiveRows::open(&missing, None).unwrap_err(),
            LearnError::DbMissing { .. }
        ));
        let text = dir.path().join("t.db");
        std::fs::write(&text, "hello").unwrap();
        let e = LiveRows::open(&text, None).unwrap_err();
        assert!(e.to_string().contains("not a VM's state repository"), "{e}");
    }
}
