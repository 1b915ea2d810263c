/// The telehealth schema, versioned. Each migration is a schema batch, logged and
/// replayed like any other, so every site reaches the same version at the same LSN.
///
/// Patients are references to the hospital's records, not medical records. Timestamps
/// are ISO 8601 text in UTC; a default such as `strftime('now')` is evaluated once on the
/// primary and replicated as the value it produced.
public enum TelehealthSchema {
    public static let migrations: [WriteBatch] = [
        WriteBatch([
            SQLStatement("""
                CREATE TABLE patients (
                    id INTEGER PRIMARY KEY,
                    reference TEXT NOT NULL UNIQUE,
                    created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')))
                """),
            SQLStatement("""
                CREATE TABLE practitioners (
                    id INTEGER PRIMARY KEY,
                    reference TEXT NOT NULL UNIQUE,
                    name TEXT NOT NULL,
                    specialty TEXT,
                    created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')))
                """),
            SQLStatement("""
                CREATE TABLE appointments (
                    id INTEGER PRIMARY KEY,
                    practitioner_id INTEGER NOT NULL REFERENCES practitioners(id),
                    patient_id INTEGER NOT NULL REFERENCES patients(id),
                    starts_at TEXT NOT NULL,
                    duration_minutes INTEGER NOT NULL CHECK (duration_minutes BETWEEN 5 AND 480),
                    mode TEXT NOT NULL CHECK (mode IN ('video', 'phone')),
                    status TEXT NOT NULL DEFAULT 'booked' CHECK (status IN ('booked', 'cancelled', 'completed', 'no_show')),
                    booked_at_site TEXT NOT NULL,
                    created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
                    updated_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')))
                """),
            SQLStatement("CREATE INDEX appointments_by_practitioner ON appointments (practitioner_id, starts_at)"),
            SQLStatement("CREATE INDEX appointments_by_patient ON appointments (patient_id, starts_at)"),
            SQLStatement("""
                CREATE TABLE teleconsultations (
                    id INTEGER PRIMARY KEY,
                    appointment_id INTEGER NOT NULL UNIQUE REFERENCES appointments(id),
                    started_at TEXT,
                    ended_at TEXT,
                    outcome TEXT CHECK (outcome IS NULL OR outcome IN ('completed', 'interrupted', 'referred')),
                    notes_reference TEXT)
                """),
            SQLStatement("""
                CREATE TABLE tele_expertise_requests (
                    id INTEGER PRIMARY KEY,
                    requesting_practitioner_id INTEGER NOT NULL REFERENCES practitioners(id),
                    expert_practitioner_id INTEGER REFERENCES practitioners(id),
                    patient_id INTEGER NOT NULL REFERENCES patients(id),
                    specialty TEXT NOT NULL,
                    question TEXT NOT NULL,
                    status TEXT NOT NULL DEFAULT 'open' CHECK (status IN ('open', 'answered', 'closed')),
                    answer TEXT,
                    created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
                    answered_at TEXT)
                """),
            SQLStatement("""
                CREATE TABLE documents (
                    id INTEGER PRIMARY KEY,
                    patient_id INTEGER NOT NULL REFERENCES patients(id),
                    appointment_id INTEGER REFERENCES appointments(id),
                    kind TEXT NOT NULL CHECK (kind IN ('report', 'patient_upload')),
                    content_type TEXT NOT NULL,
                    size INTEGER NOT NULL CHECK (size >= 0),
                    sha256 TEXT NOT NULL CHECK (length(sha256) = 64),
                    bytes BLOB NOT NULL,
                    created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
                    CHECK (length(bytes) = size))
                """),
            SQLStatement("CREATE INDEX documents_by_patient ON documents (patient_id)"),
        ], schemaVersion: 1),
    ]

    /// The version the migrations reach.
    public static var latestVersion: Int { migrations.last?.schemaVersion ?? 0 }

    /// The migrations a database at `version` still needs, in order.
    public static func pending(after version: Int) -> [WriteBatch] {
        migrations.filter { $0.schemaVersion > version }
    }
}
