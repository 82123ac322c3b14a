//! The state machine's view of a write transaction: each table opened at
//! most once, on first use, and kept open until the view is dropped.
//!
//! Opening a redb table looks its name up in the table tree and closing it
//! writes the table's root back; for a small command that was a good part
//! of its cost, paid for every table the command touched. Applying a run
//! of committed entries through one [`Tx`] pays it once per table per run.
//!
//! A table is borrowed for as long as the returned handle lives, exactly
//! as redb allows one open handle per table and transaction: code that
//! already worked with `open_table` works unchanged, and a second borrow
//! of a table still in use is [`redb::TableError::TableAlreadyOpen`], not a
//! panic.

use std::cell::{OnceCell, RefCell, RefMut};
use std::panic::Location;

use redb::{Table, TableError, TableHandle, WriteTransaction};

use super::state_machine::{SmTable, SM_TABLES};

/// An open state machine table.
pub type SmTableMut<'txn> = Table<'txn, &'static [u8], &'static [u8]>;

/// A write transaction's state machine tables, each opened once.
pub struct Tx<'txn> {
    txn: &'txn WriteTransaction,
    /// One cell per [`SM_TABLES`] entry, at the same position.
    open: Vec<OnceCell<RefCell<SmTableMut<'txn>>>>,
}

impl<'txn> Tx<'txn> {
    /// A view of `txn` with no table open yet. Drop it before committing
    /// `txn`: the tables close then.
    pub fn new(txn: &'txn WriteTransaction) -> Self {
        Tx {
            txn,
            open: SM_TABLES.iter().map(|_| OnceCell::new()).collect(),
        }
    }

    /// The table `def` (one of [`SM_TABLES`]), opened on first use.
    ///
    /// # Errors
    /// [`TableError::TableAlreadyOpen`] while another handle to the same
    /// table is alive; [`TableError::TableDoesNotExist`] for a table that is
    /// not a state machine table; redb's errors opening it.
    #[track_caller]
    pub fn table(&self, def: SmTable) -> Result<RefMut<'_, SmTableMut<'txn>>, TableError> {
        let name = def.name();
        let Some(i) = SM_TABLES.iter().position(|d| d.name() == name) else {
            return Err(TableError::TableDoesNotExist(format!(
                "{name} (not a state machine table)"
            )));
        };
        let cell = &self.open[i];
        let table = match cell.get() {
            Some(t) => t,
            None => {
                let t = self.txn.open_table(def)?;
                cell.get_or_init(|| RefCell::new(t))
            }
        };
        table
            .try_borrow_mut()
            .map_err(|_| TableError::TableAlreadyOpen(name.to_string(), Location::caller()))
    }
}

#[cfg(test)]
mod tests {
    use redb::{ReadableDatabase, ReadableTable, TableDefinition};

    use super::*;
    use crate::meta::records::{TASKS_TABLE, TENANTS_TABLE};

    #[test]
    fn tables_open_once_and_borrow_like_redb() {
        let dir = tempfile::tempdir().unwrap();
        let db = redb::Database::create(dir.path().join("t.redb")).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let tx = Tx::new(&txn);
            tx.table(TASKS_TABLE)
                .unwrap()
                .insert(b"a".as_slice(), b"1".as_slice())
                .unwrap();
            // Two tables at once are fine; the same one twice is refused.
            let tasks = tx.table(TASKS_TABLE).unwrap();
            let mut tenants = tx.table(TENANTS_TABLE).unwrap();
            tenants.insert(b"t".as_slice(), b"2".as_slice()).unwrap();
            assert!(matches!(
                tx.table(TASKS_TABLE),
                Err(TableError::TableAlreadyOpen(..))
            ));
            assert_eq!(tasks.get(b"a".as_slice()).unwrap().unwrap().value(), b"1");
            drop(tasks);
            assert!(tx.table(TASKS_TABLE).is_ok());
            let other: SmTable = TableDefinition::new("not_in_the_state_machine");
            assert!(matches!(
                tx.table(other),
                Err(TableError::TableDoesNotExist(_))
            ));
        }
        txn.commit().unwrap();
        let read = db.begin_read().unwrap();
        let tasks = read.open_table(TASKS_TABLE).unwrap();
        assert_eq!(tasks.get(b"a".as_slice()).unwrap().unwrap().value(), b"1");
        let tenants = read.open_table(TENANTS_TABLE).unwrap();
        assert_eq!(tenants.get(b"t".as_slice()).unwrap().unwrap().value(), b"2");
    }
}
