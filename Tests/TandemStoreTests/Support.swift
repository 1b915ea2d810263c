import Foundation
import TandemModel
import TandemWAL
@testable import TandemStore

struct TempDir {
    let path: String
    init(_ label: String = "store") {
        path = NSTemporaryDirectory() + "tandem-test-\(label)-\(UUID().uuidString)"
        try? FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
    }
    func cleanup() { try? FileManager.default.removeItem(atPath: path) }
    func sub(_ name: String) -> String { path + "/" + name }
}

let cluster = ClusterID("0b6f3a3e-6a53-4d0e-9f0c-5c2d8e8f7a10")!

/// A fresh store with the telehealth schema applied at LSN 1.
func telehealthStore(_ dir: String) throws -> StateStore {
    let store = try StateStore.create(directory: dir, clusterID: cluster)
    var lsn = store.appliedLSN
    for m in TelehealthSchema.migrations {
        lsn = lsn.next
        _ = try store.execute(m, lsn: lsn, term: Term(1))
    }
    store.markCommitted(through: lsn)
    return store
}

func seedPeople(_ store: StateStore, term: UInt64 = 1) throws -> LogRecord {
    try store.execute(WriteBatch([
        SQLStatement("INSERT INTO practitioners (id, reference, name, specialty) VALUES (1, 'RPPS-100', 'Dr Weber', 'neurology')"),
        SQLStatement("INSERT INTO practitioners (id, reference, name, specialty) VALUES (2, 'RPPS-200', 'Dr Klein', 'cardiology')"),
        SQLStatement("INSERT INTO patients (id, reference) VALUES (1, 'IPP-1'), (2, 'IPP-2'), (3, 'IPP-3')"),
    ]), lsn: store.appliedLSN.next, term: Term(term)).record
}

func booking(_ id: Int, practitioner: Int = 1, patient: Int = 1, at: String = "2021-03-10T09:00:00Z") -> WriteBatch {
    WriteBatch([SQLStatement(
        "INSERT INTO appointments (id, practitioner_id, patient_id, starts_at, duration_minutes, mode, booked_at_site) VALUES (?, ?, ?, ?, 20, 'video', 'sbg')",
        [.integer(Int64(id)), .integer(Int64(practitioner)), .integer(Int64(patient)), .text(at)])])
}
