//! This node's active set: at most `database.max_active_databases` engines
//! run here at once, and their RSS stays within `max_active_memory`. A wake
//! that would go past either first puts to sleep the least recently used
//! running databases that have no open session (a hibernation like any
//! other, backed up as one). When none can go, it waits its turn (wakes
//! pass first come, first served, whatever their app) for up to
//! `database.active_wait`, then is refused naming the limit. A database with
//! open sessions is never put to sleep to make room.
//!
//! A wake that finds a free place by count takes it without a turn. Only
//! the choice of a database to put to sleep is made in turn: a wake that
//! puts another database to sleep takes that database's place at once and
//! stops it outside the turnstile, so that a full node makes room for
//! several wakes at a time.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rouse_config::DatabaseConfig;
use rouse_control_api::*;
use tracing::{info, warn};

use super::Manager;
use crate::error::{ControlError, Result};
use crate::metrics::{ACTIVE_SET_WAITS, EVICTIONS, EVICTION_CHURN};
use crate::process::usage;

/// About an rqlited's RSS here, to derive the default bound from memory.
const ENGINE_RSS: u64 = 32 << 20;
/// A database woken again this soon after it was put to sleep to make room
/// counts as churn.
const CHURN: Duration = Duration::from_secs(60);
/// How often engine memory is measured at most (it reads `/proc`).
const MEASURE_EVERY: Duration = Duration::from_secs(1);
/// How long a replica the others can do without waits for room: long
/// enough to pass the turnstile in a storm, not for sessions to end.
const OPTIONAL_WAIT: Duration = Duration::from_secs(1);
/// How often a waiting wake looks for room again.
const RETRY: Duration = Duration::from_millis(100);
/// A database started this recently is not put to sleep to make room: it
/// was started for a client being served now, whose session the proxy
/// reports at once (a request in flight, at its next report).
const FRESH: Duration = Duration::from_secs(1);

pub(super) struct ActiveSet {
    pub(super) max_databases: usize,
    pub(super) max_memory: u64,
    wait: Duration,
    /// Wakes looking for room pass one at a time, in the order they came.
    turnstile: tokio::sync::Mutex<()>,
    /// Databases given a seat whose engines are not running yet. Seats
    /// are given with this lock held, so two cannot take the last place.
    booting: Arc<Mutex<HashSet<DbKey>>>,
    /// Databases whose engines run here (a [`Place`] each).
    running: Arc<AtomicUsize>,
    /// Databases being put to sleep to make room: their places are taken.
    leaving: Mutex<HashSet<DbKey>>,
    /// When each database was last put to sleep to make room.
    evicted: Mutex<HashMap<DbKey, Instant>>,
    /// Engine RSS as last measured, and when.
    measured: Mutex<Option<(Instant, u64)>>,
}

impl ActiveSet {
    pub(super) fn new(config: &DatabaseConfig) -> ActiveSet {
        let usable = usage::memory_total() / 4 * 3;
        ActiveSet {
            max_databases: match config.max_active_databases {
                0 => (usable / ENGINE_RSS).max(1) as usize,
                n => n as usize,
            },
            max_memory: match config.max_active_memory {
                0 => usable,
                n => n,
            },
            wait: config.active_wait,
            turnstile: tokio::sync::Mutex::new(()),
            booting: Default::default(),
            running: Default::default(),
            leaving: Default::default(),
            evicted: Default::default(),
            measured: Mutex::new(None),
        }
    }
}

impl ActiveSet {
    /// A running database's place, counted until it is dropped.
    pub(super) fn place(&self) -> Place {
        self.running.fetch_add(1, Ordering::Relaxed);
        Place(self.running.clone())
    }
}

/// Counts a database whose engines run here, as long as it lives.
pub(super) struct Place(Arc<AtomicUsize>);

impl Drop for Place {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A wake's place in the active set until its engines run (or it fails).
pub(super) struct Seat {
    booting: Arc<Mutex<HashSet<DbKey>>>,
    key: DbKey,
}

impl Drop for Seat {
    fn drop(&mut self) {
        self.booting
            .lock()
            .expect("active set poisoned")
            .remove(&self.key);
    }
}

impl Manager {
    /// Room for `key`'s engines here, made by putting idle databases to
    /// sleep when the active set is full. An `optional` replica (the other
    /// holders make a quorum without it) hardly waits for room.
    pub(super) async fn take_seat(&self, key: &DbKey, optional: bool) -> Result<Seat> {
        let set = &self.active;
        // A free place by count (which counts a database leaving twice):
        // no scan, no turn.
        if let Ok(seat) = self.seat_if_room(key, None) {
            return Ok(seat);
        }
        let asked = Instant::now();
        let deadline = asked + if optional { OPTIONAL_WAIT } else { set.wait };
        // Databases that would not go (sessions opened meanwhile).
        let mut kept: HashSet<DbKey> = HashSet::new();
        loop {
            let (seat, victim) = {
                let left = deadline.saturating_duration_since(Instant::now());
                let Ok(_turn) = tokio::time::timeout(left, set.turnstile.lock()).await else {
                    return Err(self.refuse(key, "max_active_databases"));
                };
                let (idle, occupied) = self.running_here(Some(key));
                match self.seat_if_room(key, Some(&occupied)) {
                    Ok(seat) => (seat, None),
                    Err(limit) => match idle.into_iter().find(|k| !kept.contains(k)) {
                        Some(victim) => {
                            set.leaving
                                .lock()
                                .expect("active set poisoned")
                                .insert(victim.clone());
                            (self.seat(key), Some((victim, limit)))
                        }
                        None if Instant::now() + RETRY >= deadline => {
                            return Err(self.refuse(key, limit));
                        }
                        None => {
                            drop(_turn);
                            tokio::time::sleep(RETRY).await;
                            // Sessions may have closed meanwhile.
                            kept.clear();
                            continue;
                        }
                    },
                }
            };
            let Some((victim, limit)) = victim else {
                if asked.elapsed() > RETRY {
                    ACTIVE_SET_WAITS.counter(["room".into()]).increment(1);
                }
                return Ok(seat);
            };
            info!(database = %victim, waking = %key, limit, "putting the least recently used database to sleep to make room");
            let slept = self.hibernate_here(&victim, false).await;
            set.leaving
                .lock()
                .expect("active set poisoned")
                .remove(&victim);
            match slept {
                Ok(_) => {
                    EVICTIONS.counter([limit.into()]).increment(1);
                    set.evicted
                        .lock()
                        .expect("active set poisoned")
                        .insert(victim, Instant::now());
                    *set.measured.lock().expect("active set poisoned") = None;
                    return Ok(seat);
                }
                Err(e) => {
                    // Its place is its own again; look again.
                    warn!(database = %victim, error = %e, "could not put the database to sleep to make room");
                    drop(seat);
                    kept.insert(victim);
                }
            }
        }
    }

    /// Whether `key`'s engines run here: a start then needs no new place.
    pub(super) fn runs_here(&self, key: &DbKey) -> bool {
        self.slot(key)
            .running
            .try_lock()
            .is_ok_and(|run| run.is_some())
    }

    /// Whether a database started here now would put none to sleep (by
    /// count, which counts a database leaving twice).
    pub(super) fn has_active_room(&self) -> bool {
        let booting = self.active.booting.lock().expect("active set poisoned");
        self.free_place(None, &booting).is_ok()
    }

    /// A seat for `key` when a place is free: with `occupied` (the
    /// databases running, starting or stopping here, from a scan) exactly,
    /// else by count. Otherwise the limit reached.
    fn seat_if_room(
        &self,
        key: &DbKey,
        occupied: Option<&[DbKey]>,
    ) -> std::result::Result<Seat, &'static str> {
        let mut booting = self.active.booting.lock().expect("active set poisoned");
        self.free_place(occupied, &booting)?;
        booting.insert(key.clone());
        drop(booting);
        Ok(self.seated(key))
    }

    /// `Ok` when one more database fits beside those `occupied` (else
    /// counted) and those `booting`; otherwise the limit reached.
    fn free_place(
        &self,
        occupied: Option<&[DbKey]>,
        booting: &HashSet<DbKey>,
    ) -> std::result::Result<(), &'static str> {
        let set = &self.active;
        let running = match occupied {
            // Those that finished booting since the scan are counted once.
            Some(keys) => keys.iter().filter(|k| !booting.contains(*k)).count(),
            None => set.running.load(Ordering::Relaxed),
        };
        let count = running + booting.len();
        if count >= set.max_databases {
            Err("max_active_databases")
        } else if self.memory_bound_reached(count, booting.len()) {
            Err("max_active_memory")
        } else {
            Ok(())
        }
    }

    /// A place in the active set for `key`, counted until its engines run.
    fn seat(&self, key: &DbKey) -> Seat {
        self.active
            .booting
            .lock()
            .expect("active set poisoned")
            .insert(key.clone());
        self.seated(key)
    }

    /// The seat of `key`, just put among the booting.
    fn seated(&self, key: &DbKey) -> Seat {
        let set = &self.active;
        let churned = set
            .evicted
            .lock()
            .expect("active set poisoned")
            .remove(key)
            .is_some_and(|at| at.elapsed() < CHURN);
        if churned {
            EVICTION_CHURN.counter([]).increment(1);
        }
        Seat {
            booting: set.booting.clone(),
            key: key.clone(),
        }
    }

    fn refuse(&self, key: &DbKey, limit: &str) -> ControlError {
        let set = &self.active;
        ACTIVE_SET_WAITS.counter(["refused".into()]).increment(1);
        warn!(database = %key, limit, "wake refused: the active set is full of databases in use");
        let value = match limit {
            "max_active_databases" => set.max_databases.to_string(),
            _ => format!("{} MiB", set.max_memory >> 20),
        };
        ControlError::ActiveSetFull {
            limit: format!("{limit} = {value}"),
        }
    }

    /// Whether the engines' memory, with `count` running or booting
    /// (`booting` of them not running yet), has reached
    /// `max_active_memory`. Measured only when it could have: a measure
    /// reads every engine's page tables.
    fn memory_bound_reached(&self, count: usize, booting: usize) -> bool {
        let set = &self.active;
        if (count as u64) * ENGINE_RSS * 2 < set.max_memory {
            return false;
        }
        self.engine_memory() + booting as u64 * ENGINE_RSS >= set.max_memory
    }

    /// The databases running here other than `except` and those leaving,
    /// the ones without open sessions least recently used first; and every
    /// one running, starting or stopping here, but for those (a leaving
    /// database's place is its successor's).
    fn running_here(&self, except: Option<&DbKey>) -> (Vec<DbKey>, Vec<DbKey>) {
        let booting = self
            .active
            .booting
            .lock()
            .expect("active set poisoned")
            .clone();
        let leaving = self
            .active
            .leaving
            .lock()
            .expect("active set poisoned")
            .clone();
        let mut occupied = Vec::new();
        let mut idle = Vec::new();
        for (k, slot) in self.all_slots() {
            if Some(&k) == except || leaving.contains(&k) {
                continue;
            }
            match slot.running.try_lock() {
                // Starting or stopping: it holds its place meanwhile.
                Err(_) => occupied.push(k),
                Ok(run) => {
                    let Some(run) = run.as_ref() else { continue };
                    if !booting.contains(&k)
                        && self.activity.open_sessions(&k) == 0
                        && run.started.elapsed() >= FRESH
                    {
                        idle.push(k.clone());
                    }
                    occupied.push(k);
                }
            }
        }
        idle.sort_by_key(|k| self.activity.last_activity(k).unwrap_or(0));
        (idle, occupied)
    }

    /// The RSS of the engines running here, measured at most once a second.
    fn engine_memory(&self) -> u64 {
        let mut measured = self.active.measured.lock().expect("active set poisoned");
        if let Some((at, bytes)) = *measured {
            if at.elapsed() < MEASURE_EVERY {
                return bytes;
            }
        }
        let mut bytes = 0;
        for (_, slot) in self.all_slots() {
            if let Ok(run) = slot.running.try_lock() {
                if let Some(run) = run.as_ref() {
                    bytes += run
                        .processes
                        .iter()
                        .map(|p| usage::tree_memory(p.pid()))
                        .sum::<u64>();
                }
            }
        }
        *measured = Some((Instant::now(), bytes));
        bytes
    }
}
