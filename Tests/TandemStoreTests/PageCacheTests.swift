import CSQLite
import CSQLitePageCache
import Foundation
import Testing
import TandemModel
@testable import TandemStore

/// The page-cache wrapper (Sources/CSQLitePageCache) must never keep a page SQLite asked
/// it to drop: a connection that kept one would read stale rows.
@Suite("SQLite page cache")
struct PageCacheTests {
    /// Opens two connections on one database: `reader` caches every page, `writer` changes
    /// every row, then `reader` sums again. True when the reader saw the writer's change.
    /// SQLite clears the reader's cache (a truncation to zero) when it sees the file
    /// changed; a wrapper that skipped that truncation would leave the old pages.
    static func readerSeesWriter(flaw: Bool) throws -> Bool {
        let dir = TempDir("pagecache")
        defer { dir.cleanup() }
        let path = dir.sub("db.sqlite")
        // The flaw is per thread: this synchronous function runs on one thread throughout.
        tandem_pagecache_set_testing_flaw(flaw ? 1 : 0)
        defer { tandem_pagecache_set_testing_flaw(0) }
        let reader = try SQLiteConnection(path: path, create: true)
        try reader.exec("""
            PRAGMA journal_mode = WAL; CREATE TABLE t (id INTEGER PRIMARY KEY, v INTEGER);
            WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 5000)
            INSERT INTO t SELECT x, 1 FROM c
            """)
        let writer = try SQLiteConnection(path: path, create: false)
        #expect(try reader.rows("SELECT sum(v) FROM t") == [[.integer(5000)]])
        try writer.exec("UPDATE t SET v = 2")
        return try reader.rows("SELECT sum(v) FROM t") == [[.integer(10000)]]
    }

    @Test("a connection reads what another wrote; the check catches a wrapper that forgets the pages it holds")
    func readerSeesWriterAndTheCheckCatchesAFlaw() throws {
        #expect(SQLitePageCache.installation == SQLITE_OK, "the wrapper is installed before SQLite initializes")
        #expect(try Self.readerSeesWriter(flaw: false))
        #expect(try !Self.readerSeesWriter(flaw: true), "with the deliberate flaw the reader must see stale rows")
    }

    @Test("random inserts, updates, deletes, rolled-back savepoints and VACUUM leave the database equal to a model; commits skip the cache scan")
    func randomWritesMatchAModel() throws {
        let dir = TempDir("pagecache")
        defer { dir.cleanup() }
        let path = dir.sub("db.sqlite")
        let db = try SQLiteConnection(path: path, create: true)
        // A small cache, so that pages are evicted and fetched again as well.
        try db.exec("""
            PRAGMA journal_mode = WAL; PRAGMA cache_size = 200;
            CREATE TABLE t (id TEXT PRIMARY KEY, v BLOB NOT NULL)
            """)
        var model: [String: [UInt8]] = [:]
        var rng = SeededRandom(seed: 0x9a6e)
        let before = SQLitePageCache.truncations
        var commits: UInt64 = 0
        func key() -> String { String(rng.next() % 4000, radix: 16) + "-" + String(repeating: "k", count: Int(rng.next() % 40)) }
        func value() -> [UInt8] { (0..<Int(rng.next() % 900)).map { _ in UInt8(truncatingIfNeeded: rng.next()) } }
        for round in 0..<600 {
            try db.exec("BEGIN")
            var pending = model
            // Writes that a savepoint then rolls back must leave no trace.
            let undone = rng.next() % 4 == 0
            for _ in 0..<Int(1 + rng.next() % 30) {
                let k = key()
                switch rng.next() % 3 {
                case 0, 1:
                    let v = value()
                    _ = try db.rows("INSERT INTO t (id, v) VALUES (?1, ?2) ON CONFLICT (id) DO UPDATE SET v = excluded.v", [.text(k), .blob(v)])
                    pending[k] = v
                default:
                    _ = try db.rows("DELETE FROM t WHERE id = ?1", [.text(k)])
                    pending[k] = nil
                }
            }
            if undone {
                try db.exec("SAVEPOINT s")
                for _ in 0..<Int(1 + rng.next() % 200) {
                    _ = try db.rows("INSERT OR REPLACE INTO t (id, v) VALUES (?1, ?2)", [.text(key() + "-gone"), .blob(value())])
                }
                try db.exec("ROLLBACK TO s; RELEASE s")
            }
            if rng.next() % 10 == 0 {
                try db.exec("ROLLBACK")
            } else {
                try db.exec("COMMIT")
                commits += 1
                model = pending
            }
            // VACUUM shrinks the file: a truncation that has pages to drop.
            if round % 150 == 149 { try db.exec("VACUUM") }
        }
        #expect(try db.rows("PRAGMA integrity_check") == [[.text("ok")]])
        let rows = try db.rows("SELECT id, v FROM t ORDER BY id")
        let expected: [[SQLValue]] = model.keys.sorted { Array($0.utf8).lexicographicallyPrecedes(Array($1.utf8)) }
            .map { [.text($0), .blob(model[$0] ?? [])] }
        #expect(rows == expected, "the database differs from the model")
        // A fresh connection reads the file as written.
        let other = try SQLiteConnection(path: path, create: false)
        #expect(try other.rows("SELECT id, v FROM t ORDER BY id") == expected)
        let after = SQLitePageCache.truncations
        // Other tests may add to the process-wide counters; they never subtract.
        #expect(after.skipped - before.skipped >= commits / 2,
                "most commits had nothing beyond the database's end to drop: \(after.skipped - before.skipped) skipped for \(commits) commits")
        #expect(after.passed > before.passed, "VACUUM's truncations reach SQLite's cache")
    }
}
