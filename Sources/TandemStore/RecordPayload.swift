import TandemModel

/// A batch of statements that runs as one transaction.
public struct WriteBatch: Hashable, Sendable {
    public var statements: [SQLStatement]
    /// For schema batches: the telehealth (or application) schema version they bring the
    /// database to; 0 leaves the recorded version as it is.
    public var schemaVersion: Int

    public init(_ statements: [SQLStatement], schemaVersion: Int = 0) {
        self.statements = statements
        self.schemaVersion = schemaVersion
    }
}

/// The payload of a `.schema` log record: the statements, replayed as SQL in log order.
///
///     u8  format (1)
///     u32 schema version (0: unchanged)
///     u32 statement count, then per statement:
///         u32 SQL length, SQL (UTF-8)
///         u32 parameter count, then per parameter a tagged value:
///             0 NULL | 1 i64 | 2 f64 bits | 3 u32 len + UTF-8 | 4 u32 len + bytes
enum SchemaPayload {
    static let format: UInt8 = 1

    static func encode(_ batch: WriteBatch) -> [UInt8] {
        var w = ByteWriter(capacity: 256)
        w.u8(format)
        w.u32(UInt32(batch.schemaVersion))
        w.u32(UInt32(batch.statements.count))
        for s in batch.statements {
            w.string(s.sql)
            w.u32(UInt32(s.params.count))
            for p in s.params { encode(p, into: &w) }
        }
        return w.bytes
    }

    static func encode(_ v: SQLValue, into w: inout ByteWriter) {
        switch v {
        case .null: w.u8(0)
        case let .integer(x): w.u8(1); w.i64(x)
        case let .real(x): w.u8(2); w.u64(x.bitPattern)
        case let .text(s): w.u8(3); w.string(s)
        case let .blob(b): w.u8(4); w.blob(b)
        }
    }

    static func decode(_ bytes: [UInt8]) throws(DecodingError) -> WriteBatch {
        var r = ByteReader(bytes)
        do {
            let f = try r.u8("format")
            guard f == format else { throw DecodingError("unknown schema record format \(f)", offset: 0) }
            let version = Int(try r.u32("schema version"))
            let n = Int(try r.u32("statement count"))
            guard n <= bytes.count else { throw DecodingError("statement count \(n) exceeds the payload", offset: 5) }
            var statements: [SQLStatement] = []
            for _ in 0..<n {
                let sql = try r.string("SQL")
                let pn = Int(try r.u32("parameter count"))
                guard pn <= r.remaining else { throw DecodingError("parameter count \(pn) exceeds the payload", offset: r.offset) }
                var params: [SQLValue] = []
                for _ in 0..<pn { params.append(try decodeValue(&r)) }
                statements.append(SQLStatement(sql, params))
            }
            guard r.isAtEnd else { throw DecodingError("\(r.remaining) trailing bytes", offset: r.offset) }
            return WriteBatch(statements, schemaVersion: version)
        } catch let e as DecodingError {
            throw e
        } catch {
            throw DecodingError("\(error)", offset: r.offset)
        }
    }

    static func decodeValue(_ r: inout ByteReader) throws -> SQLValue {
        switch try r.u8("value tag") {
        case 0: return .null
        case 1: return .integer(try r.i64())
        case 2: return .real(Double(bitPattern: try r.u64()))
        case 3: return .text(try r.string("text value"))
        case 4: return .blob(try r.blob("blob value"))
        case let t: throw DecodingError("unknown value tag \(t)", offset: r.offset - 1)
        }
    }
}
