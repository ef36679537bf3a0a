//! A redb [`StorageBackend`] that models a power cut, for crash-consistency tests.
//!
//! Owns: simulated disks. Each disk has a *durable image* (what is on the platter) and a
//! *volatile* layer (the writes and length changes since the last `sync_data`, as an ordered list
//! of operations, and the image they produce, which reads see). `sync_data` makes the volatile
//! layer durable. A shared [`PowerSwitch`] can cut the power at any moment — by hand with
//! [`PowerSwitch::cut`], or at the n-th I/O call with [`PowerSwitch::cut_at_io`]: the volatile
//! layer of every disk is then lost according to the [`LossModel`], and every later I/O of every
//! backend made before the cut fails with an `io::Error` (so the `Database` using it errors out,
//! it never sees the state after the cut). [`PowerSwitch::restore`] turns the power back on:
//! new backends over the same disks read the durable images, which is a reboot.
//!
//! What is lost at a cut ([`LossModel`]):
//! - [`LossModel::LoseUnsynced`]: every write since the last sync of that disk (the minimum any
//!   disk guarantees: synced data survives, unsynced data may not).
//! - [`LossModel::Reordered`]: each unsynced write or length change survives or is lost on its
//!   own, at random (a disk cache that flushes in any order): the survivors are applied in
//!   their original order over the durable image.
//! - [`LossModel::Torn`]: as `Reordered`, and each surviving write keeps only a random subset of
//!   its 512-byte sectors (sector writes are atomic, larger writes are not).
//!
//! Everything is deterministic given the seed and the sequence of I/O calls, so a failing seed
//! reproduces. Never: used by production code (test support, behind the `fault-injection`
//! feature).

use std::{
    fmt,
    io::{self, ErrorKind},
    sync::{Arc, Mutex, MutexGuard},
};

use rand::{rngs::StdRng, Rng, SeedableRng};
use redb::StorageBackend;

/// Size of the unit a [`LossModel::Torn`] cut keeps or loses inside one write.
pub const SECTOR: usize = 512;

/// What a power cut does to the writes that were not synced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LossModel {
    /// All unsynced writes are lost.
    LoseUnsynced,
    /// A random subset of the unsynced writes survives.
    Reordered,
    /// A random subset of the unsynced writes survives, each of them torn at sector granularity.
    Torn,
}

/// Identifies one disk of a [`PowerSwitch`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DiskId(usize);

#[derive(Debug)]
enum Op {
    Write { offset: usize, data: Vec<u8> },
    SetLen(usize),
}

#[derive(Debug, Default)]
struct Disk {
    durable: Vec<u8>,
    /// `durable` with `pending` applied: what reads see while the power is on.
    current: Vec<u8>,
    pending: Vec<Op>,
    /// `sync_data` reports success without making anything durable (a lying write cache).
    lying_sync: bool,
    bytes_written: u64,
}

fn apply(image: &mut Vec<u8>, op: &Op) {
    match op {
        Op::Write { offset, data } => write_at(image, *offset, data),
        Op::SetLen(len) => image.resize(*len, 0),
    }
}

fn write_at(image: &mut Vec<u8>, offset: usize, data: &[u8]) {
    // A write past the end extends the file, as a real file does.
    if image.len() < offset + data.len() {
        image.resize(offset + data.len(), 0);
    }
    image[offset..offset + data.len()].copy_from_slice(data);
}

struct Rack {
    model: LossModel,
    rng: StdRng,
    powered: bool,
    /// Bumped by every cut: backends of an older generation stay dead after `restore`.
    generation: u64,
    io_calls: u64,
    cut_at_io: Option<u64>,
    cuts: u64,
    disks: Vec<Disk>,
}

impl Rack {
    fn cut(&mut self) {
        if !self.powered {
            return;
        }
        self.powered = false;
        self.generation += 1;
        self.cuts += 1;
        self.cut_at_io = None;
        for disk in &mut self.disks {
            let pending = std::mem::take(&mut disk.pending);
            for op in pending {
                match self.model {
                    LossModel::LoseUnsynced => {}
                    LossModel::Reordered => {
                        if self.rng.random_bool(0.5) {
                            apply(&mut disk.durable, &op);
                        }
                    }
                    LossModel::Torn => {
                        if !self.rng.random_bool(0.5) {
                            continue;
                        }
                        match op {
                            Op::SetLen(_) => apply(&mut disk.durable, &op),
                            Op::Write { offset, data } => {
                                // Sectors are aligned to the file, not to the write.
                                let mut start = 0;
                                while start < data.len() {
                                    let end = (((offset + start) / SECTOR + 1) * SECTOR - offset).min(data.len());
                                    if self.rng.random_bool(0.5) {
                                        write_at(&mut disk.durable, offset + start, &data[start..end]);
                                    }
                                    start = end;
                                }
                            }
                        }
                    }
                }
            }
            disk.current = disk.durable.clone();
        }
    }
}

/// The power supply of a set of simulated disks. Cloning shares it.
#[derive(Clone)]
pub struct PowerSwitch {
    rack: Arc<Mutex<Rack>>,
}

impl fmt::Debug for PowerSwitch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let rack = self.lock();
        f.debug_struct("PowerSwitch")
            .field("model", &rack.model)
            .field("powered", &rack.powered)
            .field("io_calls", &rack.io_calls)
            .field("cuts", &rack.cuts)
            .finish()
    }
}

impl PowerSwitch {
    /// A powered switch without disks; `seed` drives which writes a cut keeps.
    pub fn new(seed: u64, model: LossModel) -> Self {
        let rack = Rack {
            model,
            rng: StdRng::seed_from_u64(seed),
            powered: true,
            generation: 0,
            io_calls: 0,
            cut_at_io: None,
            cuts: 0,
            disks: Vec::new(),
        };
        PowerSwitch { rack: Arc::new(Mutex::new(rack)) }
    }

    fn lock(&self) -> MutexGuard<'_, Rack> {
        // A panic while holding the lock leaves the rack consistent (every step is complete).
        self.rack.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds an empty disk.
    pub fn add_disk(&self) -> DiskId {
        self.add_disk_with_image(Vec::new())
    }

    /// Adds a disk whose durable content is `image` (e.g. a copy of another disk).
    pub fn add_disk_with_image(&self, image: Vec<u8>) -> DiskId {
        let mut rack = self.lock();
        rack.disks.push(Disk { current: image.clone(), durable: image, ..Disk::default() });
        DiskId(rack.disks.len() - 1)
    }

    /// A backend over `disk`, alive until the next cut.
    pub fn backend(&self, disk: DiskId) -> PowerCutBackend {
        let generation = self.lock().generation;
        PowerCutBackend { switch: self.clone(), disk, generation }
    }

    /// Cuts the power now.
    pub fn cut(&self) {
        self.lock().cut();
    }

    /// Cuts the power when the I/O call number `n` (counted from 0 since the switch was made, over
    /// all disks) is attempted; that call fails.
    pub fn cut_at_io(&self, n: u64) {
        let mut rack = self.lock();
        if rack.io_calls >= n {
            rack.cut();
        } else {
            rack.cut_at_io = Some(n);
        }
    }

    /// Turns the power back on. Backends made before the cut stay dead; make new ones.
    pub fn restore(&self) {
        self.lock().powered = true;
    }

    pub fn is_powered(&self) -> bool {
        self.lock().powered
    }

    /// I/O calls (len, read, write, set_len, sync) attempted so far.
    pub fn io_calls(&self) -> u64 {
        self.lock().io_calls
    }

    /// Bytes written so far, over all disks.
    pub fn bytes_written(&self) -> u64 {
        self.lock().disks.iter().map(|d| d.bytes_written).sum()
    }

    /// A copy of the durable image of `disk`.
    pub fn durable_image(&self, disk: DiskId) -> Vec<u8> {
        self.lock().disks[disk.0].durable.clone()
    }

    /// Makes `sync_data` of `disk` report success without making anything durable: a disk that
    /// lies about its write cache. Used to prove that the tests notice a missing fsync.
    pub fn set_lying_sync(&self, disk: DiskId, lying: bool) {
        self.lock().disks[disk.0].lying_sync = lying;
    }
}

/// A redb storage backend over one disk of a [`PowerSwitch`].
pub struct PowerCutBackend {
    switch: PowerSwitch,
    disk: DiskId,
    generation: u64,
}

impl fmt::Debug for PowerCutBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PowerCutBackend").field("disk", &self.disk).field("generation", &self.generation).finish()
    }
}

fn power_lost() -> io::Error {
    io::Error::other("power cut: the device is gone")
}

impl PowerCutBackend {
    /// Runs one I/O call on the disk, if the power is on for this backend.
    fn io<T>(&self, f: impl FnOnce(&mut Disk) -> io::Result<T>) -> io::Result<T> {
        let mut rack = self.switch.lock();
        let call = rack.io_calls;
        rack.io_calls += 1;
        if rack.cut_at_io == Some(call) {
            rack.cut();
        }
        if !rack.powered || rack.generation != self.generation {
            return Err(power_lost());
        }
        let disk = rack.disks.get_mut(self.disk.0).ok_or_else(|| io::Error::from(ErrorKind::NotFound))?;
        f(disk)
    }
}

impl StorageBackend for PowerCutBackend {
    fn len(&self) -> Result<u64, io::Error> {
        self.io(|d| Ok(d.current.len() as u64))
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), io::Error> {
        self.io(|d| {
            let start = usize::try_from(offset).map_err(|_| io::Error::from(ErrorKind::InvalidInput))?;
            let src =
                d.current.get(start..start + out.len()).ok_or_else(|| io::Error::from(ErrorKind::UnexpectedEof))?;
            out.copy_from_slice(src);
            Ok(())
        })
    }

    fn set_len(&self, len: u64) -> Result<(), io::Error> {
        self.io(|d| {
            let len = usize::try_from(len).map_err(|_| io::Error::from(ErrorKind::InvalidInput))?;
            let op = Op::SetLen(len);
            apply(&mut d.current, &op);
            d.pending.push(op);
            Ok(())
        })
    }

    fn sync_data(&self) -> Result<(), io::Error> {
        self.io(|d| {
            if !d.lying_sync {
                for op in std::mem::take(&mut d.pending) {
                    apply(&mut d.durable, &op);
                }
            }
            Ok(())
        })
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), io::Error> {
        self.io(|d| {
            let offset = usize::try_from(offset).map_err(|_| io::Error::from(ErrorKind::InvalidInput))?;
            write_at(&mut d.current, offset, data);
            d.bytes_written += data.len() as u64;
            d.pending.push(Op::Write { offset, data: data.to_vec() });
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use redb::{Database, ReadableDatabase, TableDefinition};

    use super::*;

    const T: TableDefinition<u64, u64> = TableDefinition::new("t");

    fn put(db: &Database, k: u64, durability: redb::Durability) -> Result<(), redb::Error> {
        let mut txn = db.begin_write()?;
        txn.set_durability(durability)?;
        txn.open_table(T)?.insert(k, k)?;
        txn.commit()?;
        Ok(())
    }

    fn keys(db: &Database) -> Vec<u64> {
        let txn = db.begin_read().unwrap();
        let table = match txn.open_table(T) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Vec::new(),
            Err(e) => panic!("open table: {e}"),
        };
        table.range(0..).unwrap().map(|r| r.unwrap().0.value()).collect()
    }

    #[test]
    fn synced_writes_survive_a_cut_and_unsynced_ones_do_not() {
        let switch = PowerSwitch::new(1, LossModel::LoseUnsynced);
        let disk = switch.add_disk();
        let db = Database::builder().create_with_backend(switch.backend(disk)).unwrap();
        put(&db, 1, redb::Durability::Immediate).unwrap();
        put(&db, 2, redb::Durability::None).unwrap();
        assert_eq!(keys(&db), vec![1, 2]);
        switch.cut();
        assert!(put(&db, 3, redb::Durability::Immediate).is_err(), "I/O after the cut fails");
        drop(db);
        switch.restore();
        let db = Database::builder().create_with_backend(switch.backend(disk)).unwrap();
        assert_eq!(keys(&db), vec![1]);
    }

    #[test]
    fn a_lying_sync_loses_acknowledged_commits() {
        let switch = PowerSwitch::new(1, LossModel::LoseUnsynced);
        let disk = switch.add_disk();
        let db = Database::builder().create_with_backend(switch.backend(disk)).unwrap();
        put(&db, 1, redb::Durability::Immediate).unwrap();
        switch.set_lying_sync(disk, true);
        put(&db, 2, redb::Durability::Immediate).unwrap();
        switch.cut();
        drop(db);
        switch.restore();
        let db = Database::builder().create_with_backend(switch.backend(disk)).unwrap();
        assert_eq!(keys(&db), vec![1]);
    }

    /// redb alone under every loss model: after a cut at any I/O call, the database opens and
    /// holds exactly the commits acknowledged as durable, plus possibly the one in flight.
    #[test]
    fn redb_recovers_the_acknowledged_prefix_at_every_cut_point() {
        for model in [LossModel::LoseUnsynced, LossModel::Reordered, LossModel::Torn] {
            for cut in (0..400).step_by(7) {
                let seed = cut * 31 + 7;
                let switch = PowerSwitch::new(seed, model);
                let disk = switch.add_disk();
                let mut acked = 0;
                if let Ok(db) = Database::builder().create_with_backend(switch.backend(disk)) {
                    switch.cut_at_io(cut);
                    for k in 1..=200u64 {
                        let durable = k % 3 != 0;
                        let durability = if durable { redb::Durability::Immediate } else { redb::Durability::None };
                        match put(&db, k, durability) {
                            Ok(()) if durable => acked = k,
                            Ok(()) => {}
                            Err(_) => break,
                        }
                    }
                }
                switch.cut();
                switch.restore();
                let db = Database::builder()
                    .create_with_backend(switch.backend(disk))
                    .unwrap_or_else(|e| panic!("{model:?} seed {seed} cut {cut}: reopen failed: {e}"));
                let got = keys(&db);
                let n = got.len() as u64;
                assert!(n >= acked && n <= acked + 2, "{model:?} cut {cut}: acked {acked}, got {got:?}");
                assert_eq!(got, (1..=n).collect::<Vec<_>>(), "{model:?} cut {cut}: not a prefix");
            }
        }
    }
}
