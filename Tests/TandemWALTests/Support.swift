import Foundation
import TandemModel
@testable import TandemWAL

/// A fresh directory under the system temp dir, removed by `cleanup()`.
struct TempDir {
    let path: String
    init(_ label: String = "wal") {
        path = NSTemporaryDirectory() + "tandem-test-\(label)-\(UUID().uuidString)"
        try? FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
    }
    func cleanup() { try? FileManager.default.removeItem(atPath: path) }
    func file(_ name: String) -> String { path + "/" + name }
}

let testCluster = ClusterID("6f1c8a52-3d7e-4c1b-9a0e-2b7d5f9e4c11")!

func smallOptions(preallocate: Bool = true) -> WALOptions {
    var o = WALOptions()
    o.segmentSize = 64 << 10
    o.preallocate = preallocate
    return o
}

func record(_ lsn: UInt64, term: UInt64 = 1, size: Int = 40) -> LogRecord {
    var payload = [UInt8](repeating: 0, count: size)
    for i in 0..<size { payload[i] = UInt8(truncatingIfNeeded: Int(lsn) &* 31 &+ i) }
    return LogRecord(term: Term(term), lsn: LSN(lsn), kind: .changeset, payload: payload)
}

func readAll(_ log: WriteAheadLog) throws -> [LogRecord] {
    var out: [LogRecord] = []
    var from = log.firstLSN
    while from <= log.lastLSN {
        let batch = try log.read(from: from, maxBytes: 1 << 20)
        if batch.isEmpty { break }
        out.append(contentsOf: batch)
        from = batch[batch.count - 1].lsn.next
    }
    return out
}

func fileBytes(_ path: String) -> [UInt8] { [UInt8](FileManager.default.contents(atPath: path) ?? Data()) }
func writeBytes(_ bytes: [UInt8], _ path: String) { _ = FileManager.default.createFile(atPath: path, contents: Data(bytes)) }
