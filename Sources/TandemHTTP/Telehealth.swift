import Foundation
import TandemModel
import TandemNode
import TandemStore
import TandemTransport

/// Times in the telehealth API: ISO 8601 in UTC, to the second (`2026-03-10T09:30:00Z`),
/// and days (`2026-03-10`). Stored normalised, so that text order is time order.
enum TelehealthTime {
    static func instant(_ text: String, field: String) throws(APIError) -> String {
        let f = ISO8601DateFormatter()
        f.formatOptions = [.withInternetDateTime]
        guard let d = f.date(from: text) else {
            throw APIError.badRequest("bad_value", "\(field) must be a UTC time like 2026-03-10T09:30:00Z, found \"\(text)\"")
        }
        let out = ISO8601DateFormatter()
        out.formatOptions = [.withInternetDateTime]
        out.timeZone = TimeZone(identifier: "UTC")
        return out.string(from: d)
    }

    /// The day's start and the next day's start, as stored times.
    static func day(_ text: String, field: String = "day") throws(APIError) -> (String, String) {
        let f = DateFormatter()
        f.locale = Locale(identifier: "en_US_POSIX")
        f.timeZone = TimeZone(identifier: "UTC")
        f.dateFormat = "yyyy-MM-dd"
        guard text.count == 10, let d = f.date(from: text) else {
            throw APIError.badRequest("bad_value", "\(field) must be a day like 2026-03-10, found \"\(text)\"")
        }
        let out = ISO8601DateFormatter()
        out.formatOptions = [.withInternetDateTime]
        out.timeZone = TimeZone(identifier: "UTC")
        return (out.string(from: d), out.string(from: d.addingTimeInterval(86_400)))
    }
}

extension DataAPI {
    static let appointmentColumns = """
        SELECT a.id, pr.reference AS practitioner, pa.reference AS patient, a.starts_at, a.duration_minutes, a.mode, a.status,
               a.booked_at_site, a.created_at, a.updated_at
        FROM appointments a JOIN practitioners pr ON pr.id = a.practitioner_id JOIN patients pa ON pa.id = a.patient_id
        """

    /// No other booked appointment of the same practitioner overlaps [?start, ?start + ?minutes).
    static func noOverlap(practitioner: String, start: String, minutes: String, except: String) -> String {
        """
        NOT EXISTS (SELECT 1 FROM appointments o WHERE o.practitioner_id = \(practitioner) AND o.status = 'booked' AND o.id <> \(except)
                    AND julianday(o.starts_at) < julianday(\(start)) + \(minutes) / 1440.0
                    AND julianday(\(start)) < julianday(o.starts_at) + o.duration_minutes / 1440.0)
        """
    }

    // POST /v1/appointments
    func bookAppointment(_ call: ForwardedCall) async throws(APIError) -> ForwardedAnswer {
        let f = try FieldReader(try JSONValue.parse(call.body),
                                allowed: ["practitioner", "practitioner_name", "specialty", "patient", "starts_at", "duration_minutes", "mode"])
        let practitioner = try f.requiredString("practitioner"), patient = try f.requiredString("patient")
        let start = try TelehealthTime.instant(try f.requiredString("starts_at"), field: "starts_at")
        guard let minutes = try f.integer("duration_minutes"), (5...480).contains(minutes) else {
            throw APIError.badRequest("bad_value", "duration_minutes is required, between 5 and 480")
        }
        let mode = try f.string("mode") ?? "video"
        guard mode == "video" || mode == "phone" else { throw APIError.badRequest("bad_value", "mode must be \"video\" or \"phone\", found \"\(mode)\"") }
        let name = try f.string("practitioner_name") ?? practitioner
        let batch = WriteBatch([
            SQLStatement("INSERT OR IGNORE INTO patients (reference) VALUES (?1)", [.text(patient)]),
            SQLStatement("INSERT OR IGNORE INTO practitioners (reference, name, specialty) VALUES (?1, ?2, ?3)",
                         [.text(practitioner), .text(name), try f.string("specialty").map { .text($0) } ?? .null]),
            SQLStatement("""
                INSERT INTO appointments (practitioner_id, patient_id, starts_at, duration_minutes, mode, booked_at_site)
                SELECT pr.id, pa.id, ?3, ?4, ?5, ?6 FROM practitioners pr, patients pa
                WHERE pr.reference = ?1 AND pa.reference = ?2
                  AND \(Self.noOverlap(practitioner: "pr.id", start: "?3", minutes: "?4", except: "0"))
                """, [.text(practitioner), .text(patient), .text(start), .integer(minutes), .text(mode),
                      .text(call.header("Tandem-Received-By") ?? settings.site.name)],
                requireChanges: true),
        ])
        let e: Execution
        do { e = try await write(batch) } catch {
            if error.code == "precondition_failed" {
                throw APIError.conflict("slot_taken", "\(practitioner) already has a booked appointment overlapping \(start) for \(minutes) minutes")
            }
            throw error
        }
        let id = e.results.last?.lastInsertRowID ?? 0
        let body: [String: Any] = ["id": id, "practitioner": practitioner, "patient": patient, "starts_at": start,
                                   "duration_minutes": minutes, "mode": mode, "status": "booked", "lsn": e.record.lsn.rawValue]
        var h = dataHeaders(lsn: e.record.lsn)
        h.append(ForwardedHeader(name: "Location", value: "/v1/appointments/\(id)"))
        return ForwardedAnswer(status: 201, headers: h, body: encodeJSON(body))
    }

    // GET /v1/appointments?practitioner=P&day=D | ?patient=X
    func listAppointments(_ call: ForwardedCall) async throws(APIError) -> ForwardedAnswer {
        let (sql, params) = try appointmentFilter(call, requireOne: true)
        return try await rows(call, SQLStatement(Self.appointmentColumns + sql + " ORDER BY a.starts_at, a.id", params), key: "appointments")
    }

    func appointmentFilter(_ call: ForwardedCall, requireOne: Bool) throws(APIError) -> (String, [SQLValue]) {
        try checkQuery(call, allowed: ["practitioner", "patient", "day", "status", "consistency", "min_lsn", "format"])
        var clauses: [String] = []
        var params: [SQLValue] = []
        if let p = queryItem(call, "practitioner") { params.append(.text(p)); clauses.append("pr.reference = ?\(params.count)") }
        if let p = queryItem(call, "patient") { params.append(.text(p)); clauses.append("pa.reference = ?\(params.count)") }
        if let d = queryItem(call, "day") {
            let (from, to) = try TelehealthTime.day(d)
            params.append(.text(from)); clauses.append("a.starts_at >= ?\(params.count)")
            params.append(.text(to)); clauses.append("a.starts_at < ?\(params.count)")
        }
        if let s = queryItem(call, "status") { params.append(.text(s)); clauses.append("a.status = ?\(params.count)") }
        if requireOne && queryItem(call, "practitioner") == nil && queryItem(call, "patient") == nil {
            throw APIError.badRequest("missing_field", "give practitioner (and day), or patient")
        }
        return (clauses.isEmpty ? "" : " WHERE " + clauses.joined(separator: " AND "), params)
    }

    func checkQuery(_ call: ForwardedCall, allowed: Set<String>) throws(APIError) {
        for item in URLComponents(string: "http://x/?" + call.query)?.queryItems ?? [] where !allowed.contains(item.name) {
            throw APIError.badRequest("unknown_field", "unknown query parameter \"\(item.name)\" (known: \(allowed.sorted().joined(separator: ", ")))")
        }
    }

    func readOptions(_ call: ForwardedCall) throws(APIError) -> (ReadConsistency, LSN) {
        let c = try consistency(queryItem(call, "consistency"))
        var minLSN = LSN.zero
        if let m = queryItem(call, "min_lsn") {
            guard let n = UInt64(m) else { throw APIError.badRequest("bad_value", "min_lsn must be a non-negative integer, found \"\(m)\"") }
            minLSN = LSN(n)
        }
        return (c, minLSN)
    }

    /// Rows as a JSON list of objects under `key`.
    func rows(_ call: ForwardedCall, _ statement: SQLStatement, key: String) async throws(APIError) -> ForwardedAnswer {
        let (c, minLSN) = try readOptions(call)
        let r = try await read(statement, consistency: c, minLSN: minLSN)
        let items: [[String: Any]] = r.rows.map { row in
            Dictionary(uniqueKeysWithValues: zip(r.columns, row.map(\.json)))
        }
        var body: [String: Any] = [key: items, "lsn": r.appliedLSN.rawValue, "consistency": c.rawValue]
        if c == .local { body["stale"] = isStale }
        return ForwardedAnswer(status: 200, headers: dataHeaders(lsn: r.appliedLSN, consistency: c), body: encodeJSON(body))
    }

    // POST /v1/appointments/{id}/cancel
    func cancelAppointment(_ id: Int64) async throws(APIError) -> ForwardedAnswer {
        let batch = WriteBatch([SQLStatement("""
            UPDATE appointments SET status = 'cancelled', updated_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now')
            WHERE id = ?1 AND status = 'booked'
            """, [.integer(id)], requireChanges: true)])
        do {
            let e = try await write(batch)
            return ForwardedAnswer(status: 200, headers: dataHeaders(lsn: e.record.lsn),
                                   body: encodeJSON(["id": id, "status": "cancelled", "lsn": e.record.lsn.rawValue] as [String: Any]))
        } catch {
            guard error.code == "precondition_failed" else { throw error }
            throw try await appointmentRefusal(id, doing: "cancel")
        }
    }

    /// Why a change to appointment `id` changed nothing: it does not exist (404), or it is
    /// not booked any more (409). Read on this site, the primary, which just refused it.
    func appointmentRefusal(_ id: Int64, doing: String) async throws(APIError) -> APIError {
        let r = try await read(SQLStatement("SELECT status FROM appointments WHERE id = ?1", [.integer(id)]), consistency: .local, minLSN: .zero)
        guard let row = r.rows.first, case let .text(status)? = row.first else { return APIError.notFound("no appointment \(id)") }
        if status != "booked" { return APIError.conflict("not_booked", "appointment \(id) is \(status); only a booked one can be \(doing == "cancel" ? "cancelled" : "rescheduled")") }
        return APIError.conflict("slot_taken", "the new time overlaps another booked appointment of the same practitioner")
    }

    // POST /v1/appointments/{id}/reschedule
    func rescheduleAppointment(_ id: Int64, _ call: ForwardedCall) async throws(APIError) -> ForwardedAnswer {
        let f = try FieldReader(try JSONValue.parse(call.body), allowed: ["starts_at", "duration_minutes"])
        let start = try TelehealthTime.instant(try f.requiredString("starts_at"), field: "starts_at")
        let minutes = try f.integer("duration_minutes")
        if let minutes, !(5...480).contains(minutes) { throw APIError.badRequest("bad_value", "duration_minutes must be between 5 and 480") }
        let batch = WriteBatch([SQLStatement("""
            UPDATE appointments SET starts_at = ?2, duration_minutes = coalesce(?3, duration_minutes),
                   updated_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now')
            WHERE id = ?1 AND status = 'booked'
              AND \(Self.noOverlap(practitioner: "appointments.practitioner_id", start: "?2",
                                   minutes: "coalesce(?3, appointments.duration_minutes)", except: "appointments.id"))
            """, [.integer(id), .text(start), minutes.map { .integer($0) } ?? .null], requireChanges: true)])
        do {
            let e = try await write(batch)
            return ForwardedAnswer(status: 200, headers: dataHeaders(lsn: e.record.lsn),
                                   body: encodeJSON(["id": id, "starts_at": start, "lsn": e.record.lsn.rawValue] as [String: Any]))
        } catch {
            guard error.code == "precondition_failed" else { throw error }
            throw try await appointmentRefusal(id, doing: "reschedule")
        }
    }

    // GET /v1/export/appointments?day=D[&practitioner=P]&format=csv|json: this site's own
    // copy, so that it works on every site, a degraded one included.
    func exportAppointments(_ call: ForwardedCall) async throws(APIError) -> ForwardedAnswer {
        guard queryItem(call, "day") != nil else { throw APIError.badRequest("missing_field", "day is required, like day=2026-03-10") }
        let (sql, params) = try appointmentFilter(call, requireOne: false)
        let format = queryItem(call, "format") ?? "json"
        guard format == "json" || format == "csv" else { throw APIError.badRequest("bad_value", "format must be csv or json, found \"\(format)\"") }
        let (_, minLSN) = try readOptions(call)
        let r = try await read(SQLStatement(Self.appointmentColumns + sql + " ORDER BY a.starts_at, a.id", params), consistency: .local, minLSN: minLSN)
        var headers = dataHeaders(lsn: r.appliedLSN, consistency: .local)
        if format == "json" {
            let items: [[String: Any]] = r.rows.map { Dictionary(uniqueKeysWithValues: zip(r.columns, $0.map(\.json))) }
            return ForwardedAnswer(status: 200, headers: headers,
                                   body: encodeJSON(["appointments": items, "lsn": r.appliedLSN.rawValue, "stale": isStale,
                                                     "site": settings.site.name] as [String: Any]))
        }
        func field(_ v: SQLValue) -> String {
            let s: String = switch v {
            case .null: ""
            case let .integer(i): String(i)
            case let .real(d): String(d)
            case let .text(t): t
            case let .blob(b): Data(b).base64EncodedString()
            }
            return s.contains(where: { $0 == "," || $0 == "\"" || $0 == "\n" || $0 == "\r" })
                ? "\"" + s.replacingOccurrences(of: "\"", with: "\"\"") + "\"" : s
        }
        var csv = r.columns.joined(separator: ",") + "\r\n"
        for row in r.rows { csv += row.map(field).joined(separator: ",") + "\r\n" }
        headers[0] = ForwardedHeader(name: "Content-Type", value: "text/csv; charset=utf-8")
        return ForwardedAnswer(status: 200, headers: headers, body: Array(csv.utf8))
    }

    // POST /v1/documents: the body is the document itself.
    func uploadDocument(_ call: ForwardedCall) async throws(APIError) -> ForwardedAnswer {
        try checkQuery(call, allowed: [])
        guard let patient = call.header("Tandem-Patient"), !patient.isEmpty else {
            throw APIError.badRequest("missing_field", "the Tandem-Patient header (the patient's reference) is required")
        }
        let kind = call.header("Tandem-Document-Kind") ?? "patient_upload"
        guard kind == "report" || kind == "patient_upload" else {
            throw APIError.badRequest("bad_value", "Tandem-Document-Kind must be report or patient_upload, found \"\(kind)\"")
        }
        var appointment: SQLValue = .null
        if let a = call.header("Tandem-Appointment") {
            guard let n = Int64(a), n > 0 else { throw APIError.badRequest("bad_value", "Tandem-Appointment must be an appointment id") }
            appointment = .integer(n)
        }
        guard call.body.count <= settings.maxDocumentBytes else {
            throw APIError(status: 413, code: "too_large", message: "the document has \(call.body.count) bytes; the limit is \(settings.maxDocumentBytes)")
        }
        guard !call.body.isEmpty else { throw APIError.badRequest("missing_field", "the document is empty") }
        let sha = SHA256Hasher.hex(SHA256Hasher.digest(call.body))
        if let claimed = call.header("Tandem-SHA256"), claimed.lowercased() != sha {
            throw APIError.badRequest("checksum_mismatch", "the document's SHA-256 is \(sha), not \(claimed) as the Tandem-SHA256 header says: it was damaged on the way")
        }
        let type = call.contentType.isEmpty ? "application/octet-stream" : call.contentType
        let batch = WriteBatch([
            SQLStatement("INSERT OR IGNORE INTO patients (reference) VALUES (?1)", [.text(patient)]),
            SQLStatement("""
                INSERT INTO documents (patient_id, appointment_id, kind, content_type, size, sha256, bytes)
                SELECT p.id, ?2, ?3, ?4, ?5, ?6, ?7 FROM patients p
                WHERE p.reference = ?1 AND (?2 IS NULL OR EXISTS (SELECT 1 FROM appointments WHERE id = ?2))
                """, [.text(patient), appointment, .text(kind), .text(type), .integer(Int64(call.body.count)), .text(sha), .blob(call.body)],
                requireChanges: true),
        ])
        let e: Execution
        do { e = try await write(batch) } catch {
            if error.code == "precondition_failed" { throw APIError.notFound("no appointment \(appointment)") }
            throw error
        }
        let id = e.results.last?.lastInsertRowID ?? 0
        var h = dataHeaders(lsn: e.record.lsn)
        h.append(ForwardedHeader(name: "Location", value: "/v1/documents/\(id)"))
        return ForwardedAnswer(status: 201, headers: h, body: encodeJSON(
            ["id": id, "patient": patient, "kind": kind, "content_type": type, "size": call.body.count, "sha256": sha,
             "lsn": e.record.lsn.rawValue] as [String: Any]))
    }

    // GET /v1/documents/{id}: the bytes, checked against the SHA-256 stored with them.
    func document(_ id: Int64, _ call: ForwardedCall) async throws(APIError) -> ForwardedAnswer {
        try checkQuery(call, allowed: ["consistency", "min_lsn"])
        let (c, minLSN) = try readOptions(call)
        let r = try await read(SQLStatement("SELECT content_type, sha256, bytes FROM documents WHERE id = ?1", [.integer(id)]),
                               consistency: c, minLSN: minLSN)
        guard let row = r.rows.first, row.count == 3, case let .text(type) = row[0], case let .text(sha) = row[1], case let .blob(bytes) = row[2] else {
            throw APIError.notFound("no document \(id)")
        }
        guard SHA256Hasher.hex(SHA256Hasher.digest(bytes)) == sha else {
            throw APIError(status: 500, code: "document_corrupt", message: "document \(id) on this site does not match its SHA-256; read it from another site and rebuild this one")
        }
        var h = dataHeaders(lsn: r.appliedLSN, consistency: c)
        h[0] = ForwardedHeader(name: "Content-Type", value: type)
        h.append(ForwardedHeader(name: "Tandem-SHA256", value: sha))
        h.append(ForwardedHeader(name: "ETag", value: "\"\(sha)\""))
        return ForwardedAnswer(status: 200, headers: h, body: bytes)
    }

    // GET /v1/documents?patient=X: the list, without the bytes.
    func listDocuments(_ call: ForwardedCall) async throws(APIError) -> ForwardedAnswer {
        try checkQuery(call, allowed: ["patient", "consistency", "min_lsn"])
        guard let patient = queryItem(call, "patient") else { throw APIError.badRequest("missing_field", "patient is required") }
        return try await rows(call, SQLStatement("""
            SELECT d.id, p.reference AS patient, d.appointment_id, d.kind, d.content_type, d.size, d.sha256, d.created_at
            FROM documents d JOIN patients p ON p.id = d.patient_id WHERE p.reference = ?1 ORDER BY d.id
            """, [.text(patient)]), key: "documents")
    }
}
