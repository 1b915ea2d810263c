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
        tandem_pagecache_set_testing(flaw ? Int32(TANDEM_PAGECACHE_FLAW_FETCHED) : 0, 0)
        defer { tandem_pagecache_set_testing(0, 0) }
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

    /// Random inserts, updates, deletes, rolled-back savepoints and transactions, and
    /// VACUUM, on one thread with the wrapper in check mode (every skipped truncation is
    /// run anyway, and counted as wrong if it dropped a page). Checks the database against
    /// a model and returns this thread's truncation counts and the commits made.
    static func randomWrites(flaw: Int32) throws -> (passed: UInt64, skipped: UInt64, wrong: UInt64, commits: UInt64) {
        let dir = TempDir("pagecache")
        defer { dir.cleanup() }
        let path = dir.sub("db.sqlite")
        tandem_pagecache_set_testing(flaw, 1)
        defer { tandem_pagecache_set_testing(0, 0) }
        let before = SQLitePageCache.threadTruncations
        let db = try SQLiteConnection(path: path, create: true)
        // A small cache, so that pages are evicted and fetched again as well.
        try db.exec("""
            PRAGMA journal_mode = WAL; PRAGMA cache_size = 200;
            CREATE TABLE t (id TEXT PRIMARY KEY, v BLOB NOT NULL)
            """)
        var model: [String: [UInt8]] = [:]
        var rng = SeededRandom(seed: 0x9a6e)
        var commits: UInt64 = 0
        func key() -> String { String(rng.next() % 4000, radix: 16) + "-" + String(repeating: "k", count: Int(rng.next() % 40)) }
        func value() -> [UInt8] { (0..<Int(rng.next() % 900)).map { _ in UInt8(truncatingIfNeeded: rng.next()) } }
        for round in 0..<600 {
            try db.exec("BEGIN")
            var pending = model
            for _ in 0..<Int(1 + rng.next() % 30) {
                let k = key()
                if rng.next() % 3 < 2 {
                    let v = value()
                    _ = try db.rows("INSERT INTO t (id, v) VALUES (?1, ?2) ON CONFLICT (id) DO UPDATE SET v = excluded.v", [.text(k), .blob(v)])
                    pending[k] = v
                } else {
                    _ = try db.rows("DELETE FROM t WHERE id = ?1", [.text(k)])
                    pending[k] = nil
                }
            }
            // Writes that a savepoint then rolls back must leave no trace.
            if rng.next() % 4 == 0 {
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
        let expected: [[SQLValue]] = model.keys.sorted { Array($0.utf8).lexicographicallyPrecedes(Array($1.utf8)) }
            .map { [.text($0), .blob(model[$0] ?? [])] }
        #expect(try db.rows("SELECT id, v FROM t ORDER BY id") == expected, "the database differs from the model")
        // A fresh connection reads the file as written.
        let other = try SQLiteConnection(path: path, create: false)
        #expect(try other.rows("SELECT id, v FROM t ORDER BY id") == expected)
        let after = SQLitePageCache.threadTruncations
        return (after.passed - before.passed, after.skipped - before.skipped, after.wrong - before.wrong, commits)
    }

    @Test("random writes, rollbacks and VACUUM match a model; no truncation is skipped that had pages to drop, and most commits skip theirs")
    func randomWritesMatchAModel() throws {
        let run = try Self.randomWrites(flaw: 0)
        #expect(run.wrong == 0, "\(run.wrong) truncations were skipped although they had pages to drop")
        #expect(run.skipped >= run.commits / 2, "\(run.skipped) truncations skipped for \(run.commits) commits")
        #expect(run.passed > 0, "VACUUM's and the rollbacks' truncations reach SQLite's cache")
        // The check itself: a wrapper that forgets the pages it fetched is caught.
        let flawed = try Self.randomWrites(flaw: Int32(TANDEM_PAGECACHE_FLAW_FETCHED))
        #expect(flawed.wrong > 0, "check mode must see the deliberately flawed wrapper skip truncations it must pass on")
    }

    /// Drives one cache through the installed wrapper: pages 1 to 5, page 3 renumbered to
    /// SQLite's temporary number, then a truncation to 5 pages. Returns the pages left.
    static func pagesLeftAfterRenumbering(flaw: Int32) throws -> Int32 {
        _ = try SQLiteConnection(path: ":memory:", create: true)  // installs and initializes
        let raw = try #require(tandem_pagecache_methods(), "the wrapper is installed")
        let m = raw.assumingMemoryBound(to: sqlite3_pcache_methods2.self).pointee
        let create = try #require(m.xCreate), fetch = try #require(m.xFetch), rekey = try #require(m.xRekey)
        let truncate = try #require(m.xTruncate), count = try #require(m.xPagecount), destroy = try #require(m.xDestroy)
        let cache = try #require(create(4096, 64, 1))
        defer { destroy(cache) }
        tandem_pagecache_set_testing(flaw, 0)
        defer { tandem_pagecache_set_testing(0, 0) }
        var pages: [UInt32: UnsafeMutablePointer<sqlite3_pcache_page>] = [:]
        for key: UInt32 in 1...5 {
            // xFetch returns an implicitly unwrapped pointer, which #require cannot check.
            guard let page = fetch(cache, key, 2) as UnsafeMutablePointer<sqlite3_pcache_page>? else {
                throw PageCacheTestFailure("page \(key) not fetched")
            }
            pages[key] = page
        }
        let temporary: UInt32 = 262_145  // the lock-byte page with 4 KiB pages
        guard let third = pages[3] else { throw PageCacheTestFailure("page 3 missing") }
        rekey(cache, third, 3, temporary)
        #expect(count(cache) == 5)
        truncate(cache, 6)  // drop pages numbered 6 and above
        return count(cache)
    }

    @Test("a page renumbered past the end is dropped by the next truncation; a wrapper that forgets renumbered pages is caught")
    func renumberedPagesAreDropped() throws {
        #expect(try Self.pagesLeftAfterRenumbering(flaw: 0) == 4)
        #expect(try Self.pagesLeftAfterRenumbering(flaw: Int32(TANDEM_PAGECACHE_FLAW_RENUMBERED)) == 5)
    }
}

/// A set-up step of a page-cache test that failed.
struct PageCacheTestFailure: Error, CustomStringConvertible {
    let description: String
    init(_ description: String) { self.description = description }
}
