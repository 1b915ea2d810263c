import COpenSSL
import TandemModel

/// SHA-256 fetched from the default provider once per process (immutable afterwards).
final class FetchedDigest: @unchecked Sendable {
    let pointer: OpaquePointer?
    init(_ name: String) { pointer = EVP_MD_fetch(nil, name, nil) }
}

let sha256Digest = FetchedDigest("SHA256")

/// SHA-256 through libcrypto.
public struct SHA256Hasher: ~Copyable {
    private let ctx: OpaquePointer

    public init() {
        // EVP_MD_CTX_new only fails when memory is exhausted; there is nothing to recover.
        guard let c = EVP_MD_CTX_new() else { preconditionFailure("EVP_MD_CTX_new failed: out of memory") }
        ctx = c
        // The digest fetched once: with OpenSSL 3, EVP_sha256() makes every init look the
        // algorithm up in the providers again, which costs more than hashing a token.
        EVP_DigestInit_ex(ctx, sha256Digest.pointer ?? EVP_sha256(), nil)
    }

    deinit { EVP_MD_CTX_free(ctx) }

    public mutating func update(_ bytes: UnsafeRawBufferPointer) {
        if let base = bytes.baseAddress, bytes.count > 0 { EVP_DigestUpdate(ctx, base, bytes.count) }
    }

    public mutating func update(_ bytes: [UInt8]) { bytes.withUnsafeBytes { update($0) } }

    public consuming func finish() -> [UInt8] {
        var out = [UInt8](repeating: 0, count: 32)
        var n: UInt32 = 0
        out.withUnsafeMutableBufferPointer { _ = EVP_DigestFinal_ex(ctx, $0.baseAddress, &n) }
        return out
    }

    public static func digest(_ bytes: [UInt8]) -> [UInt8] {
        var h = SHA256Hasher()
        h.update(bytes)
        return h.finish()
    }

    public static func hex(_ bytes: [UInt8]) -> String {
        let digits = Array("0123456789abcdef".utf8)
        var s = [UInt8]()
        s.reserveCapacity(bytes.count * 2)
        for b in bytes {
            s.append(digits[Int(b >> 4)])
            s.append(digits[Int(b & 15)])
        }
        return String(decoding: s, as: UTF8.self)
    }
}

extension StateStore {
    /// A hash of the replicated state: every user table's schema and rows in primary-key
    /// order. Sites with equal applied LSN must have equal hashes.
    public func stateHash() throws(StoreError) -> String {
        try Self.stateHash(of: db)
    }

    /// The database file this store works on (it changes when a snapshot is installed).
    public var databaseFile: String { databasePath }

    /// The applied LSN and state hash of the database in `file`, read on a connection of
    /// its own in one read transaction (a consistent snapshot of SQLite's last commit,
    /// which on a primary includes writes a quorum has not yet confirmed, as `appliedLSN`
    /// does), so the store's owner goes on meanwhile: hashing a gigabyte takes seconds,
    /// and a site's loop held that long stops its heartbeats and sets off elections. Sites
    /// with equal applied LSN must have equal hashes, as with `stateHash()`.
    public static func stateHash(ofFile file: String) throws(StoreError) -> (lsn: LSN, hash: String) {
        do {
            let db = try SQLiteConnection(path: file, create: false, readOnly: true)
            // The store's own connection may hold its lock for a moment (a checkpoint).
            try db.exec("PRAGMA busy_timeout = 10000")
            try db.exec("BEGIN")
            defer { try? db.exec("COMMIT") }
            guard let row = try db.rows("SELECT applied_lsn FROM tandem_meta WHERE id = 1").first,
                  case let .integer(lsn) = row[0]
            else { throw StoreError.io("\(file): the tandem_meta row is missing or malformed") }
            return (LSN(UInt64(lsn)), try stateHash(of: db))
        } catch let e as StoreError {
            throw e
        } catch {
            throw storeError(error)
        }
    }

    static func stateHash(of db: SQLiteConnection) throws(StoreError) -> String {
        var h = SHA256Hasher()
        do {
            let tables = try db.rows("""
                SELECT name, sql FROM sqlite_schema
                WHERE type IN ('table', 'index', 'view', 'trigger') AND name NOT LIKE 'sqlite\\_%' ESCAPE '\\'
                  AND name NOT LIKE 'tandem\\_%' ESCAPE '\\' ORDER BY type, name
                """)
            var w = ByteWriter(capacity: 1 << 16)
            for t in tables {
                for v in t { SchemaPayload.encode(v, into: &w) }
            }
            for t in tables {
                guard case let .text(name) = t[0],
                      try db.rows("SELECT type FROM sqlite_schema WHERE name = ?", [.text(name)]).first?.first == .text("table")
                else { continue }
                let pk = try db.rows("SELECT name FROM pragma_table_info(?) WHERE pk > 0 ORDER BY pk", [.text(name)])
                let order = pk.compactMap { if case let .text(c) = $0[0] { quoteIdentifier(c) } else { nil } }.joined(separator: ", ")
                let stmt = try db.prepare("SELECT * FROM \(quoteIdentifier(name))" + (order.isEmpty ? "" : " ORDER BY \(order)"))
                w.string(name)
                while try stmt.step() {
                    for i in 0..<stmt.columnCount { SchemaPayload.encode(stmt.value(i), into: &w) }
                    if w.count > 1 << 16 {
                        h.update(w.bytes)
                        w = ByteWriter(capacity: 1 << 16)
                    }
                }
            }
            h.update(w.bytes)
        } catch {
            throw Self.storeError(error)
        }
        return SHA256Hasher.hex(h.finish())
    }
}

func quoteIdentifier(_ s: String) -> String { "\"" + s.replacingOccurrences(of: "\"", with: "\"\"") + "\"" }
