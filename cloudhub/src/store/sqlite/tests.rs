//! Tests only the SQLite backend has (the shared suite is `store/tests.rs`).

use super::*;

#[test]
fn an_unwritable_path_is_a_clear_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("plain-file");
    std::fs::write(&file, b"x").expect("write");
    let err = SqliteStore::open(SqliteConfig::new(file.join("queue.db"))).expect_err("not a dir");
    assert!(!err.to_string().is_empty());
}
