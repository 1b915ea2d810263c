import ArgumentParser
import Foundation
import TandemModel
import TandemSimulation
import TandemTransport
import TandemCore
import TandemStore
import TandemWAL

/// Benchmarks. Each result is one JSON object on its own line (machine-readable), with a
/// readable summary on standard error. Build with `-c release`.
@main
struct TandemBench: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "tandem-bench",
        abstract: "Measure Tandem's storage, log and replication performance.",
        subcommands: [WALBench.self, RecoveryBench.self, ApplyBench.self, SimBench.self, CoreBench.self, TransportBench.self, ClusterBench.self, HTTPLoadBench.self])
}

struct CommonOptions: ParsableArguments {
    @Option(help: "Directory for benchmark files (on the disk to measure; removed afterwards).")
    var dir: String = FileManager.default.currentDirectoryPath + "/.tandem-bench"

    @Flag(help: "A short run, for smoke tests.")
    var quick = false

    func scratch(_ name: String) throws -> String {
        let path = dir + "/" + name + "-" + UUID().uuidString
        try FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
        return path
    }
}

/// Prints one result as a JSON line.
func emit(_ fields: [String: Any]) {
    var f = fields
    f["machine"] = ProcessInfo.processInfo.hostName
    f["cores"] = ProcessInfo.processInfo.activeProcessorCount
    if let data = try? JSONSerialization.data(withJSONObject: f, options: [.sortedKeys]), let s = String(data: data, encoding: .utf8) {
        // One write per line, so lines from a killed run are never interleaved.
        FileHandle.standardOutput.write(Data((s + "\n").utf8))
    }
}

func note(_ s: String) { FileHandle.standardError.write(Data((s + "\n").utf8)) }

func percentile(_ sorted: [Double], _ p: Double) -> Double {
    guard !sorted.isEmpty else { return 0 }
    return sorted[min(sorted.count - 1, Int(Double(sorted.count) * p))]
}

func round3(_ x: Double) -> Double { (x * 1000).rounded() / 1000 }

/// The middle value (the mean of the two middle ones for an even count); 0 when empty.
func median(_ xs: [Double]) -> Double {
    let s = xs.sorted()
    guard !s.isEmpty else { return 0 }
    return s.count % 2 == 1 ? s[s.count / 2] : (s[s.count / 2 - 1] + s[s.count / 2]) / 2
}

/// Raw fdatasync latency of a 4 KiB overwrite on a preallocated file, as the log does it.
func measureFsync(dir: String, samples: Int) throws -> (p50: Double, p99: Double) {
    let path = dir + "/fsync-probe"
    let fd = try FileDescriptor(path: path, flags: O_RDWR | O_CREAT | O_TRUNC)
    defer { unlink(path) }
    let zeros = [UInt8](repeating: 0, count: 1 << 20)
    for i in 0..<8 { try fd.write(zeros, at: i << 20) }
    try fd.sync()
    let block = [UInt8](repeating: 7, count: 4096)
    var lat: [Double] = []
    for i in 0..<samples {
        let t = monotonicNanoseconds()
        try fd.write(block, at: (i * 4096) % (8 << 20))
        try fd.syncData()
        lat.append(Double(monotonicNanoseconds() - t) / 1000)
    }
    lat.sort()
    return (percentile(lat, 0.5), percentile(lat, 0.99))
}

struct WALBench: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "wal", abstract: "Group commit: 256-byte records with 1, 16 and 64 concurrent appenders.")
    @OptionGroup var common: CommonOptions
    @Option(help: "Seconds per concurrency level.") var seconds: Double = 3
    @Flag(help: "Segments not preallocated with zeros (to measure what the preallocation costs).") var noPreallocate = false
    @Flag(help: "Batches written through the page cache instead of with O_DIRECT (to measure what direct I/O buys).") var noDirectIO = false
    @Option(help: "Segment size in MiB (the log's default is 64).") var segmentMib = 64
    @Flag(help: "Only the callback (event-loop) appenders.")
    var callbacks = false
    @Flag(help: "Only the async-task appenders.")
    var tasks = false

    func run() async throws {
        let base = try common.scratch("wal")
        defer { try? FileManager.default.removeItem(atPath: base) }
        let duration = common.quick ? 0.3 : seconds
        let fsync = try measureFsync(dir: base, samples: common.quick ? 50 : 500)
        emit(["bench": "wal.fsync", "fdatasync_p50_us": round3(fsync.p50), "fdatasync_p99_us": round3(fsync.p99)])
        note("raw fdatasync: p50 \(Int(fsync.p50)) µs, p99 \(Int(fsync.p99)) µs")
        let payload = [UInt8](repeating: 0x5A, count: 256)
        // The raw fsync measured just before each level (the previous level's "after").
        var before = fsync
        var styles: [Bool] = []
        if !tasks { styles.append(true) }
        if !callbacks { styles.append(false) }
        for callbacks in styles {
        for appenders in [1, 16, 64] {
            let dir = base + "/log-\(callbacks ? "callback" : "task")-\(appenders)"
            var options = WALOptions()
            options.preallocate = !noPreallocate
            options.directIO = !noDirectIO
            options.segmentSize = segmentMib << 20
            let log = try WriteAheadLog.create(directory: dir, clusterID: .random(), options: options)
            let deadline = monotonicNanoseconds() + UInt64(duration * 1e9)
            let start = monotonicNanoseconds()
            let latencies = callbacks ? try await callbackAppenders(log: log, appenders: appenders, deadline: deadline, payload: payload)
                : try await withThrowingTaskGroup(of: [Double].self) { group in
                for _ in 0..<appenders {
                    group.addTask {
                        var lat: [Double] = []
                        while monotonicNanoseconds() < deadline {
                            let t = monotonicNanoseconds()
                            try await log.append(term: Term(1), kind: .changeset, payload: payload)
                            lat.append(Double(monotonicNanoseconds() - t) / 1000)
                        }
                        return lat
                    }
                }
                var all: [Double] = []
                for try await l in group { all.append(contentsOf: l) }
                return all.sorted()
            }
            let elapsed = Double(monotonicNanoseconds() - start) / 1e9
            let stats = log.statistics
            log.close()
            // The raw fsync again, right after this level: this shared machine's disk
            // latency drifts, and the efficiency compares figures taken together.
            let after = try measureFsync(dir: base, samples: common.quick ? 20 : 200)
            let raw = (before.p50 + after.p50) / 2
            before = after
            let rate = Double(latencies.count) / elapsed
            let efficiency = rate * (raw / 1e6) / Double(appenders)
            // What the disk alone allows: the efficiency if the writer spent no time
            // between a batch's fdatasync and the next batch's write (encoding, completions,
            // the appenders' own work on its thread).
            let ioPerBatch = Double(stats.writeNanoseconds + stats.fsyncNanoseconds) / Double(max(1, stats.batches)) / 1e9
            let ioBound = ioPerBatch > 0 ? Double(stats.records) / Double(max(1, stats.batches)) / ioPerBatch * (raw / 1e6) / Double(appenders) : 0
            emit(["bench": "wal.append", "appender_style": callbacks ? "callback" : "task", "appenders": appenders, "record_bytes": 256, "records": latencies.count,
                  "records_per_second": round3(rate), "latency_p50_us": round3(percentile(latencies, 0.5)),
                  "latency_p99_us": round3(percentile(latencies, 0.99)), "fdatasync_p50_us": round3(raw),
                  "group_commit_efficiency": round3(efficiency), "target_efficiency_at_64": 0.7,
                  "io_bound_efficiency": round3(ioBound),
                  "batches": stats.batches, "records_per_batch": round3(Double(stats.records) / Double(max(1, stats.batches))),
                  "batch_fdatasync_mean_us": round3(Double(stats.fsyncNanoseconds) / Double(max(1, stats.batches)) / 1000),
                  "batch_write_mean_us": round3(Double(stats.writeNanoseconds) / Double(max(1, stats.batches)) / 1000),
                  "batch_cycle_mean_us": round3(elapsed * 1e6 / Double(max(1, stats.batches)))])
            note("\(callbacks ? "callback" : "task") style, \(appenders) appenders: \(Int(rate)) records/s, p50 \(Int(percentile(latencies, 0.5))) µs, p99 \(Int(percentile(latencies, 0.99))) µs, efficiency \(round3(efficiency)) (disk alone would allow \(round3(ioBound))), \(round3(Double(stats.records) / Double(max(1, stats.batches)))) records per batch, batch write \(Int(Double(stats.writeNanoseconds) / Double(max(1, stats.batches)) / 1000)) µs + fdatasync \(Int(Double(stats.fsyncNanoseconds) / Double(max(1, stats.batches)) / 1000)) µs of a \(Int(elapsed * 1e6 / Double(max(1, stats.batches)))) µs cycle")
        }
        }
    }
}

struct RecoveryBench: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "recovery", abstract: "Open (recover) a large log with a warm page cache.")
    @OptionGroup var common: CommonOptions
    @Option(help: "Log size in MiB.") var mebibytes: Int = 1024

    func run() async throws {
        let dir = try common.scratch("recovery")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let target = (common.quick ? 32 : mebibytes) << 20
        let cluster = ClusterID.random()
        let log = try WriteAheadLog.create(directory: dir, clusterID: cluster)
        let payload = [UInt8](repeating: 0x33, count: 256)
        var lsn: UInt64 = 0
        while log.byteSize < target {
            var batch: [LogRecord] = []
            for _ in 0..<4096 {
                lsn += 1
                batch.append(LogRecord(term: Term(1), lsn: LSN(lsn), kind: .changeset, payload: payload))
            }
            try await log.append(batch)
        }
        let bytes = log.byteSize
        log.close()
        // Warm the page cache, then measure the best of three opens.
        var best = Double.infinity
        var records = 0
        for _ in 0..<(common.quick ? 2 : 4) {
            let t = monotonicNanoseconds()
            let opened = try WriteAheadLog.open(directory: dir, clusterID: cluster)
            let s = Double(monotonicNanoseconds() - t) / 1e9
            records = opened.recovery.records
            opened.close()
            best = min(best, s)
        }
        let gbps = Double(bytes) / best / 1e9
        emit(["bench": "wal.recovery", "log_bytes": bytes, "records": records, "seconds": round3(best),
              "gigabytes_per_second": round3(gbps), "target_gigabytes_per_second": 1.0, "crc32c_hardware": CRC32C.isHardwareAccelerated])
        note("recovered \(bytes >> 20) MiB (\(records) records) in \(round3(best)) s: \(round3(gbps)) GB/s")
    }
}

struct ApplyBench: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "apply", abstract: "Changesets of single-row telehealth writes applied per second on a replica.")
    @OptionGroup var common: CommonOptions
    @Option(help: "Records to apply.") var records: Int = 100_000
    @Option(help: "Records per apply transaction (SiteStorage.applyCommitted uses 4096).") var batch: Int = 4096

    func run() async throws {
        let dir = try common.scratch("apply")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let cluster = ClusterID.random()
        let count = common.quick ? 5_000 : records
        let primary = try StateStore.create(directory: dir + "/primary", clusterID: cluster)
        var log: [LogRecord] = []
        for m in TelehealthSchema.migrations {
            log.append(try primary.execute(m, lsn: primary.appliedLSN.next, term: Term(1)).record)
        }
        log.append(try primary.execute(WriteBatch([
            SQLStatement("INSERT INTO practitioners (id, reference, name) VALUES (1, 'RPPS-1', 'Dr Weber')"),
            SQLStatement("WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 1000) INSERT INTO patients (id, reference) SELECT i, 'IPP-' || i FROM n"),
        ]), lsn: primary.appliedLSN.next, term: Term(1)).record)
        let setup = log.count
        // The primary's side of the same writes: each executed in its own transaction with
        // its changeset, inverse and undo row, as a write arrives (the loop's cost per write).
        @Sendable func booking(_ i: Int) -> WriteBatch {
            WriteBatch([SQLStatement(
                "INSERT INTO appointments (practitioner_id, patient_id, starts_at, duration_minutes, mode, booked_at_site) VALUES (1, ?, ?, 20, 'video', 'sbg')",
                [.integer(Int64(1 + i % 1000)), .text("2021-03-\(10 + i % 18)T\(8 + i % 10):00:00Z")])])
        }
        func report(group: Int, since start: UInt64) {
            let seconds = Double(monotonicNanoseconds() - start) / 1e9
            let micros = round3(seconds / Double(count) * 1e6)
            emit(["bench": "store.execute", "records": count, "writes_per_group": group, "seconds": round3(seconds),
                  "writes_per_second": round3(Double(count) / seconds), "microseconds_per_write": micros])
            note("executed \(count) single-row writes on a primary's store, \(group) per transaction: \(Int(Double(count) / seconds))/s, \(micros) µs each")
        }
        let executeStart = monotonicNanoseconds()
        for i in 0..<count {
            log.append(try primary.execute(booking(i), lsn: primary.appliedLSN.next, term: Term(1)).record)
            if i % 1000 == 0 { primary.markCommitted(through: primary.appliedLSN) }
        }
        report(group: 1, since: executeStart)
        // The same writes arriving 16 at a time, executed as one group (one transaction).
        let grouped = try StateStore.create(directory: dir + "/grouped", clusterID: cluster)
        try grouped.apply(Array(log[0..<setup]))
        let groupStart = monotonicNanoseconds()
        for k in stride(from: 0, to: count, by: 16) {
            var batches = ArraySlice((k..<min(count, k + 16)).map(booking))
            while !batches.isEmpty {
                // A group may stop short at its time limit; the rest go next.
                let results = grouped.execute(group: Array(batches), from: grouped.appliedLSN.next, term: Term(1))
                for r in results { _ = try r.get() }
                batches = batches.dropFirst(results.count)
            }
            if (k / 16) % 64 == 0 { grouped.markCommitted(through: grouped.appliedLSN) }
        }
        report(group: 16, since: groupStart)
        let replica = try StateStore.create(directory: dir + "/replica", clusterID: cluster)
        try replica.apply(Array(log[0..<setup]))
        let t = monotonicNanoseconds()
        var i = setup
        while i < log.count {
            let end = min(log.count, i + batch)
            try replica.apply(Array(log[i..<end]))
            i = end
        }
        let s = Double(monotonicNanoseconds() - t) / 1e9
        let rate = Double(count) / s
        let same = try replica.stateHash() == primary.stateHash()
        emit(["bench": "store.apply", "records": count, "records_per_transaction": batch, "seconds": round3(s),
              "changesets_per_second": round3(rate), "target_changesets_per_second": 50_000, "replica_hash_matches": same])
        note("applied \(count) single-row changesets in \(round3(s)) s: \(Int(rate))/s (hash matches: \(same))")
    }
}

/// Appenders that issue their next append from the previous one's durability callback:
/// the event-loop style the daemon uses, without a task hop per append.
func callbackAppenders(log: WriteAheadLog, appenders: Int, deadline: UInt64, payload: [UInt8]) async throws -> [Double] {
    final class Shared: @unchecked Sendable {
        let lock = NSLock()
        var latencies: [Double] = []
        var running = 0
        var failure: (any Error)?
        var done: CheckedContinuation<Void, Never>?
    }
    let shared = Shared()
    shared.running = appenders
    @Sendable func next(_ started: UInt64) {
        log.appendAssigning(term: Term(1), kind: .changeset, payload: payload) { result in
            let now = monotonicNanoseconds()
            shared.lock.lock()
            if case let .failure(e) = result { shared.failure = e }
            shared.latencies.append(Double(now - started) / 1000)
            let stop = now >= deadline || shared.failure != nil
            var finished: CheckedContinuation<Void, Never>?
            if stop {
                shared.running -= 1
                if shared.running == 0 { finished = shared.done }
            }
            shared.lock.unlock()
            if let finished { finished.resume() }
            if !stop { next(now) }
        }
    }
    await withCheckedContinuation { (c: CheckedContinuation<Void, Never>) in
        shared.lock.lock()
        shared.done = c
        shared.lock.unlock()
        for _ in 0..<appenders { next(monotonicNanoseconds()) }
    }
    if let f = shared.failure { throw f }
    return shared.latencies.sorted()
}

struct SimBench: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "sim", abstract: "Simulator speed: virtual seconds per wall second for a three-site scenario.")
    @OptionGroup var common: CommonOptions
    @Option(help: "Scenario file.") var scenario = "Simulations/strasbourg-fire.json"
    @Option(help: "Seeds to run.") var seeds = 50

    func run() async throws {
        let s = try Scenario.load(path: scenario)
        let count = common.quick ? 3 : seeds
        var virtual = 0.0, wall = 0.0, events = 0, failed = 0
        for seed in 1...UInt64(count) {
            let r = Simulator(scenario: s, seed: seed).run()
            virtual += r.virtualSeconds
            wall += r.wallSeconds
            events += r.events
            if !r.passed { failed += 1 }
        }
        let speedup = virtual / max(wall, 1e-9)
        emit(["bench": "sim.speed", "scenario": s.name, "sites": s.sites.count, "seeds": count, "virtual_seconds": round3(virtual),
              "wall_seconds": round3(wall), "speedup": round3(speedup), "events_per_second": round3(Double(events) / max(wall, 1e-9)),
              "target_speedup": 1000, "failed_runs": failed])
        note("\(s.name): \(count) seeds, \(Int(virtual)) s simulated in \(round3(wall)) s: \(Int(speedup))× real time, \(failed) failed")
    }
}

struct CoreBench: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "core",
        abstract: "The protocol core alone: proposals per second while its cache of recent records fills and once it is full, and their ratio.")
    @OptionGroup var common: CommonOptions
    @Option(help: "Records proposed in each of the three rounds of a measurement (the best round counts).") var records = 20_000

    /// A single-site cluster, so that a proposal commits as soon as its storage is
    /// reported durable: what is timed is the core's own work per record (propose, the
    /// log view, commit), with no network and no disk.
    func run() throws {
        var config = ClusterConfig(sites: [SiteDescriptor(id: SiteID("a"), domain: FailureDomain("dc-a"), role: .voter)])
        // Quick: a 32 MiB cache, which 90,000 records fill; rounds of 20,000 records (tens
        // of milliseconds each), long enough that a lost time slice does not decide one.
        if common.quick { config.limits.maxCachedBytes = 32 << 20 }
        let perRound = common.quick ? 20_000 : records
        let perRecord = 300 + MemoryLayout<LogRecord>.stride + 24
        guard 3 * perRound * perRecord < config.limits.maxCachedBytes else {
            throw ValidationError("--records \(perRound): three rounds would fill the cache before the first measurement ends")
        }
        var now: Instant = 1_000_000_000
        var core = try Core(id: SiteID("a"), config: config, hardState: HardState(), log: LogView(), now: now, entropy: 1)
        func settle(_ ready: Ready) {
            var next = ready
            while let id = next.storageID { next = core.step(.persisted(storageID: id), at: now, entropy: 1) }
        }
        for _ in 0..<1_000 where core.role != .primary {
            now += 10_000_000
            settle(core.step(.tick, at: now, entropy: 1))
        }
        guard core.role == .primary else { throw ValidationError("the single site did not become primary: \(core.role)") }
        let payload = [UInt8](repeating: 0x42, count: 300)
        func proposals(_ n: Int) throws -> Double {
            let start = monotonicNanoseconds()
            for _ in 0..<n {
                let (_, ready) = try core.propose(kind: .changeset, payload: payload, at: now)
                settle(ready)
            }
            return Double(n) / (Double(monotonicNanoseconds() - start) / 1e9)
        }
        // The best of three rounds: a round this short can lose a time slice to the machine.
        let filling = try (0..<3).map { _ in try proposals(perRound) }.max() ?? 0
        // Fill the cache to its limit, then measure again: an append must cost the same.
        _ = try proposals(config.limits.maxCachedBytes / perRecord + 1_000)
        let full = try (0..<3).map { _ in try proposals(perRound) }.max() ?? 0
        emit(["bench": "core.propose", "record_bytes": 300, "records_per_round": perRound, "cache_bytes": config.limits.maxCachedBytes,
              "proposals_per_second_cache_filling": round3(filling), "proposals_per_second_cache_full": round3(full),
              "full_to_filling_ratio": round3(full / max(filling, 1))])
        note("core alone: \(Int(filling)) proposals/s while its cache fills, \(Int(full)) once it is full (\(config.limits.maxCachedBytes >> 20) MiB): ratio \(round3(full / max(filling, 1)))")
    }
}

struct TransportBench: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "transport",
        abstract: "Replication over mutual TLS on loopback, with and without LZ4, next to the raw TLS ceiling measured in the same run.")
    @OptionGroup var common: CommonOptions
    @Option(help: "Seconds per measurement.") var seconds: Double = 2
    @Option(help: "Telehealth records in the generated log.") var records: Int = 20_000
    @Option(help: "Rounds of each stream, each between two measurements of the ceiling; the median is reported.") var rounds: Int = 3

    func run() async throws {
        let dir = try common.scratch("transport")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let duration = common.quick ? 0.5 : seconds
        // Certificates made the way operators make them.
        let script = FileManager.default.currentDirectoryPath + "/Deploy/make-certs.sh"
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/bin/bash")
        p.arguments = [script, dir + "/pki", "a", "b"]
        p.standardOutput = FileHandle.nullDevice
        try p.run()
        p.waitUntilExit()
        guard p.terminationStatus == 0 else { throw ValidationError("Deploy/make-certs.sh failed (run from the repository root)") }
        func ctx(_ site: String) throws -> TLSContext {
            try TLSContext(files: TLSFiles(certificate: "\(dir)/pki/\(site).pem", privateKey: "\(dir)/pki/\(site).key",
                                           certificateAuthority: "\(dir)/pki/ca.pem"))
        }
        func measureCeiling() throws -> Double {
            try TLSCeiling.measure(server: try ctx("b"), client: try ctx("a"), expectedServerName: "b", seconds: duration)
        }
        let (log, uploads) = try telehealthLog(count: common.quick ? 2_000 : records, dir: dir + "/store")
        let rawBytes = log.reduce(0) { $0 + $1.payload.count }
        let composition = Self.composition(log, uploads: uploads)
        emit(["bench": "transport.log_composition", "log_records": log.count, "log_bytes": rawBytes,
              "upload_share_of_bytes": round3(composition.uploadShare),
              "lz4_ratio_without_uploads": round3(composition.ratioWithoutUploads),
              "ratio_bound_with_uploads_stored_as_is": round3(1 / max(composition.uploadShare, 1e-9))])
        note("the log: \(Int((composition.uploadShare * 100).rounded()))% of its bytes are scanned uploads (random, as JPEG scans are); the rest compresses \(round3(composition.ratioWithoutUploads))× with LZ4; no compressor can pass \(round3(1 / max(composition.uploadShare, 1e-9)))× on the whole while the uploads stay as they are")
        // Messages as the core sends them: up to 1 MiB of records each.
        var batches: [[LogRecord]] = [[]]
        var size = 0
        for r in log {
            if size + r.payload.count > 1 << 20 && !batches[batches.count - 1].isEmpty {
                batches.append([])
                size = 0
            }
            batches[batches.count - 1].append(r)
            size += r.payload.count
        }
        // The ceiling is measured between every two streams, and each stream is compared
        // with the mean of the ceilings either side of it: this shared machine drifts by
        // half within a minute, and the ratio must compare figures taken together. The
        // median of the rounds is reported.
        var ceilings = [try measureCeiling()]
        var perMode: [RecordCompression: [(result: StreamResult, ceiling: Double)]] = [:]
        var encoderAlone: [RecordCompression: [Double]] = [:]
        let modes: [RecordCompression] = [.none, .lz4Chunks, .lz4Block]
        let roundCount = common.quick ? 1 : max(1, rounds)
        for _ in 0..<roundCount {
            for mode in modes {
                let result = try await stream(batches, compression: mode, seconds: duration, ctx: ctx)
                ceilings.append(try measureCeiling())
                perMode[mode, default: []].append((result, (ceilings[ceilings.count - 2] + ceilings[ceilings.count - 1]) / 2))
            }
            for mode in [RecordCompression.lz4Chunks, .lz4Block] {
                encoderAlone[mode, default: []].append(Self.lz4EncodingRate(batches, compression: mode, seconds: duration / 2))
            }
        }
        let ceilingMedian = median(ceilings)
        emit(["bench": "transport.tls_ceiling", "bytes_per_second": round3(ceilingMedian), "megabytes_per_second": round3(ceilingMedian / 1e6),
              "measurements": ceilings.count, "min_megabytes_per_second": round3((ceilings.min() ?? 0) / 1e6),
              "max_megabytes_per_second": round3((ceilings.max() ?? 0) / 1e6)])
        note("raw TLS 1.3 single stream on loopback: median \(Int(ceilingMedian / 1e6)) MB/s of \(ceilings.count) measurements (\(Int((ceilings.min() ?? 0) / 1e6))–\(Int((ceilings.max() ?? 0) / 1e6)))")
        for mode in [RecordCompression.lz4Chunks, .lz4Block] {
            let rates = encoderAlone[mode] ?? []
            let encoding = median(rates)
            emit(["bench": "transport.lz4_encoding_alone", "encoding": mode.rawValue, "log_megabytes_per_second": round3(encoding / 1e6),
                  "ratio_to_tls_ceiling": round3(encoding / ceilingMedian), "rounds": rates.count,
                  "per_round_megabytes_per_second": rates.map { round3($0 / 1e6) }])
            note("\(Self.label(mode)) encoding alone, one thread, no TLS: \(Int(encoding / 1e6)) MB/s of log, \(round3(encoding / ceilingMedian)) of the TLS ceiling: a stream encoded so on one thread cannot pass that")
        }
        for mode in modes {
            let runs = perMode[mode] ?? []
            let ratios = runs.map { $0.result.bytesPerSecond / $0.ceiling }
            let ratio = median(ratios)
            let bytesPerSecond = median(runs.map { $0.result.bytesPerSecond })
            let recordsPerSecond = median(runs.map { $0.result.recordsPerSecond })
            let compression = runs.last?.result.compressionRatio ?? 1
            emit(["bench": "transport.replication", "lz4": mode != .none, "encoding": mode.rawValue, "default": mode == .lz4Chunks,
                  "log_megabytes_per_second": round3(bytesPerSecond / 1e6),
                  "records_per_second": round3(recordsPerSecond), "ratio_to_tls_ceiling": round3(ratio),
                  "ratios_per_round": ratios.map(round3), "rounds": runs.count,
                  "tls_ceiling_megabytes_per_second": round3(median(runs.map { $0.ceiling }) / 1e6),
                  "target_ratio_to_tls_ceiling": 0.6, "lz4_compression_ratio": round3(compression),
                  "target_lz4_compression_ratio": 2.5, "log_records": log.count, "log_bytes": rawBytes])
            note("replication \(mode == .none ? "without LZ4" : "with " + Self.label(mode)): \(Int(bytesPerSecond / 1e6)) MB/s of log, \(Int(recordsPerSecond)) records/s, \(round3(ratio)) of the TLS ceiling (rounds: \(ratios.map { String(round3($0)) }.joined(separator: ", "))), compression \(round3(compression))×")
        }
    }

    static func label(_ mode: RecordCompression) -> String {
        switch mode {
        case .none: "no LZ4"
        case .lz4Chunks: "LZ4 in 64 KiB chunks (the default)"
        case .lz4Block: "LZ4 in one block per message (sites that predate chunks)"
        }
    }

    /// Bytes of log per second that one thread turns into LZ4 append messages, with no
    /// TLS, socket or receiver: the most a stream whose messages are encoded on one thread
    /// can carry on this machine, whatever the rest costs.
    static func lz4EncodingRate(_ batches: [[LogRecord]], compression: RecordCompression, seconds: Double) -> Double {
        var encoder = WireEncoder(compression: compression)
        var bytes = 0, framed = 0
        var i = 0
        let start = monotonicNanoseconds()
        let end = start + UInt64(seconds * 1e9)
        while monotonicNanoseconds() < end {
            let batch = batches[i % batches.count]
            let frame = encoder.message(Message(from: "a", to: "b", term: Term(1),
                                                body: .append(Append(prevLSN: batch[0].lsn.previous, prevTerm: Term(1), records: batch,
                                                                     commitLSN: .zero, round: 1))))
            bytes += batch.reduce(0) { $0 + $1.payload.count }
            framed += frame.count
            i += 1
        }
        // Used, so that the encoding cannot be optimized away.
        guard framed > 0 else { return 0 }
        return Double(bytes) / (Double(monotonicNanoseconds() - start) / 1e9)
    }

    struct StreamResult {
        var bytesPerSecond: Double
        var recordsPerSecond: Double
        var compressionRatio: Double
    }

    func stream(_ batches: [[LogRecord]], compression: RecordCompression, seconds: Double, ctx: (String) throws -> TLSContext) async throws -> StreamResult {
        final class Counter: @unchecked Sendable {
            let lock = NSLock()
            var bytes = 0
            var records = 0
        }
        let counter = Counter()
        // Ports the kernel just gave out (random ones could fall among its ephemeral ports).
        let portA = try Transport.freeLoopbackPort(), portB = try Transport.freeLoopbackPort()
        var sa = TransportSettings(site: "a", clusterID: ClusterID("8f2a1c3e-0d4b-4e6f-9a7b-1c2d3e4f5a6b")!,
                                   listen: PeerEndpoint(host: "127.0.0.1", port: portA), peers: ["b": PeerEndpoint(host: "127.0.0.1", port: portB)])
        sa.compress = compression != .none
        sa.lz4Chunks = compression == .lz4Chunks
        var sb = TransportSettings(site: "b", clusterID: sa.clusterID, listen: PeerEndpoint(host: "127.0.0.1", port: portB),
                                   peers: ["a": PeerEndpoint(host: "127.0.0.1", port: portA)])
        sb.compress = compression != .none
        sb.lz4Chunks = compression == .lz4Chunks
        let a = Transport(settings: sa, context: try ctx("a")) { _ in }
        let b = Transport(settings: sb, context: try ctx("b")) { m in
            if case let .append(ap) = m.body {
                let n = ap.records.reduce(0) { $0 + $1.payload.count }
                counter.lock.withLock {
                    counter.bytes += n
                    counter.records += ap.records.count
                }
            }
        }
        try b.start()
        try a.start()
        defer {
            a.stop()
            b.stop()
        }
        for _ in 0..<500 where a.connectedPeers.isEmpty { usleep(10_000) }
        guard !a.connectedPeers.isEmpty else { throw ValidationError("the two transports did not connect") }
        var sentBytes = 0, sentRecords = 0
        let start = monotonicNanoseconds()
        let end = start + UInt64(seconds * 1e9)
        var i = 0
        while monotonicNanoseconds() < end {
            let batch = batches[i % batches.count]
            let m = Message(from: "a", to: "b", term: Term(1),
                            body: .append(Append(prevLSN: batch[0].lsn.previous, prevTerm: Term(1), records: batch, commitLSN: .zero, round: 1)))
            // Back-pressure: wait for room in the peer's queue before encoding, as a
            // primary's flow control does; a refused send would have encoded (and
            // compressed) the message for nothing.
            let room = sa.maxQueuedBytesPerPeer - (2 << 20)
            // Bounded: a peer that stops reading fails the run instead of hanging it.
            let giveUp = end + 30_000_000_000
            while a.queuedBytes(to: "b") > room {
                guard monotonicNanoseconds() < giveUp else { throw ValidationError("the receiving transport stopped reading") }
                usleep(200)
            }
            while !a.send(m) {
                guard monotonicNanoseconds() < giveUp else { throw ValidationError("the receiving transport stopped reading") }
                usleep(200)
            }
            sentBytes += batch.reduce(0) { $0 + $1.payload.count }
            sentRecords += batch.count
            i += 1
        }
        while counter.lock.withLock({ counter.bytes < sentBytes }) && monotonicNanoseconds() < end + 30_000_000_000 { usleep(1000) }
        let elapsed = Double(monotonicNanoseconds() - start) / 1e9
        let got = counter.lock.withLock { (counter.bytes, counter.records) }
        return StreamResult(bytesPerSecond: Double(got.0) / elapsed, recordsPerSecond: Double(got.1) / elapsed,
                            compressionRatio: a.metrics.compressionRatio)
    }

    /// A telehealth log made by the real state store: bookings, cancellations,
    /// teleconsultation records, and documents (text reports and scanned uploads).
    /// The uploads' share of the log's payload bytes, and the LZ4 ratio of everything else
    /// encoded as the wire does (1 MiB messages).
    static func composition(_ log: [LogRecord], uploads: Set<LSN>) -> (uploadShare: Double, ratioWithoutUploads: Double) {
        let total = log.reduce(0) { $0 + $1.payload.count }
        let rest = log.filter { !uploads.contains($0.lsn) }
        let uploadBytes = total - rest.reduce(0) { $0 + $1.payload.count }
        var encoder = WireEncoder(compress: true)
        var i = 0
        while i < rest.count {
            var j = i, size = 0
            while j < rest.count && (j == i || size + rest[j].payload.count <= 1 << 20) {
                size += rest[j].payload.count
                j += 1
            }
            // LSNs renumbered: the wire requires consecutive records in a message.
            let records = rest[i..<j].enumerated().map { LogRecord(term: $1.term, lsn: LSN(UInt64(1 + $0)), kind: $1.kind, payload: $1.payload) }
            _ = encoder.message(Message(from: "a", to: "b", term: Term(1),
                                        body: .append(Append(prevLSN: .zero, prevTerm: Term(1), records: records, commitLSN: .zero, round: 1))))
            i = j
        }
        return (Double(uploadBytes) / Double(max(total, 1)), encoder.statistics.compressionRatio)
    }

    /// Returns the log and the LSNs of its scanned uploads.
    func telehealthLog(count: Int, dir: String) throws -> ([LogRecord], Set<LSN>) {
        let store = try StateStore.create(directory: dir, clusterID: ClusterID.random())
        var out: [LogRecord] = []
        for m in TelehealthSchema.migrations { out.append(try store.execute(m, lsn: store.appliedLSN.next, term: Term(1)).record) }
        out.append(try store.execute(WriteBatch([
            SQLStatement("WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 200) INSERT INTO practitioners (id, reference, name, specialty) SELECT i, 'RPPS-' || (10000 + i), 'Dr ' || i, CASE i % 4 WHEN 0 THEN 'neurology' WHEN 1 THEN 'cardiology' WHEN 2 THEN 'dermatology' ELSE 'general practice' END FROM n"),
            SQLStatement("WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 5000) INSERT INTO patients (id, reference) SELECT i, 'IPP-2021-' || i FROM n"),
        ]), lsn: store.appliedLSN.next, term: Term(1)).record)
        var rng = SeededRandom(seed: 2021)
        let words = ["patient", "consultation", "douleur", "thoracique", "examen", "normal", "tension", "artérielle", "traitement",
                     "suivi", "neurologique", "déficit", "moteur", "imagerie", "IRM", "recommandation", "contrôle", "semaines", "antécédents", "allergie"]
        var appointment = 0
        var uploads: Set<LSN> = []
        while out.count < count {
            let roll = rng.next() % 10
            var isUpload = false
            let batch: WriteBatch
            if roll < 5 {
                appointment += 1
                batch = WriteBatch([SQLStatement(
                    "INSERT INTO appointments (practitioner_id, patient_id, starts_at, duration_minutes, mode, booked_at_site) VALUES (?, ?, ?, ?, ?, ?)",
                    [.integer(Int64(1 + rng.next() % 200)), .integer(Int64(1 + rng.next() % 5000)),
                     .text("2021-03-\(10 + rng.next() % 18)T\(8 + rng.next() % 10):\(rng.next() % 4 * 15)0:00Z"),
                     .integer(Int64([15, 20, 30][Int(rng.next() % 3)])), .text(rng.next() % 4 == 0 ? "phone" : "video"),
                     .text(["sbg", "gra", "rbx"][Int(rng.next() % 3)])])])
            } else if roll < 6 && appointment > 0 {
                batch = WriteBatch([SQLStatement("UPDATE appointments SET status = 'cancelled', updated_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now') WHERE id = ?",
                                                 [.integer(Int64(1 + rng.next() % UInt64(appointment)))])])
            } else if roll < 9 && appointment > 0 {
                batch = WriteBatch([SQLStatement(
                    "INSERT OR REPLACE INTO teleconsultations (appointment_id, started_at, ended_at, outcome, notes_reference) VALUES (?, ?, ?, 'completed', ?)",
                    [.integer(Int64(1 + rng.next() % UInt64(appointment))), .text("2021-03-10T09:00:00Z"), .text("2021-03-10T09:18:00Z"),
                     .text("notes/\(rng.next() % 1_000_000)")])])
            } else {
                // Half text reports, half scanned uploads (which do not compress).
                let report = rng.next() % 2 == 0
                isUpload = !report
                let bytes: [UInt8] = report
                    ? Array((0..<500).map { _ in words[Int(rng.next() % UInt64(words.count))] }.joined(separator: " ").utf8)
                    : (0..<4096).map { _ in UInt8(truncatingIfNeeded: rng.next()) }
                batch = WriteBatch([SQLStatement(
                    "INSERT INTO documents (patient_id, kind, content_type, size, sha256, bytes) VALUES (?, ?, ?, ?, ?, ?)",
                    [.integer(Int64(1 + rng.next() % 5000)), .text(report ? "report" : "patient_upload"),
                     .text(report ? "text/plain; charset=utf-8" : "image/jpeg"), .integer(Int64(bytes.count)),
                     .text(SHA256Hasher.hex(SHA256Hasher.digest(bytes))), .blob(bytes)])])
            }
            out.append(try store.execute(batch, lsn: store.appliedLSN.next, term: Term(1)).record)
            if isUpload { uploads.insert(out[out.count - 1].lsn) }
            if out.count % 1000 == 0 { store.markCommitted(through: store.appliedLSN) }
        }
        return (out, uploads)
    }
}
