import Foundation
import Glibc
import TandemCore
import TandemModel

/// Runs the operator's role-change command, one event at a time in the order they
/// happened, on a thread of its own: a slow or hanging command never blocks the site.
/// Each run is bounded in time (then killed) and its failure is logged. Events beyond
/// `maxQueued` waiting are dropped, and the drop is logged.
public final class RoleHooks: @unchecked Sendable {
    public let command: String
    public let timeoutMilliseconds: Int
    public let site: SiteID
    let maxQueued = 64
    private let log: @Sendable (String) -> Void
    private let cond = NSCondition()
    // Guarded by `cond`.
    private var queue: [[String: String]] = []
    private var stopped = false

    public init(command: String, timeoutMilliseconds: Int, site: SiteID, log: @escaping @Sendable (String) -> Void) {
        self.command = command
        self.timeoutMilliseconds = timeoutMilliseconds
        self.site = site
        self.log = log
        let t = Thread { [self] in
            nameCurrentThread("role-hooks")
            run()
        }
        t.start()
    }

    /// The event name a role change gives to the command (nil: not a hook event).
    public static func event(_ change: RoleChange) -> (event: String, role: String, term: Term, reason: String)? {
        switch change {
        case let .becamePrimary(term): ("became_primary", "primary", term, "elected")
        case let .steppedDown(term, reason): ("stepped_down", "replica", term, reason)
        case let .lostMajority(term): ("lost_majority", "primary", term, "no majority heard within the lease")
        case let .regainedMajority(term): ("regained_majority", "primary", term, "a majority answers again")
        default: nil
        }
    }

    /// Queues the command for this change (returns at once).
    public func roleChanged(_ change: RoleChange) {
        guard let e = Self.event(change) else { return }
        let env = ["TANDEM_EVENT": e.event, "TANDEM_SITE": site.name, "TANDEM_ROLE": e.role,
                   "TANDEM_TERM": String(e.term.rawValue), "TANDEM_REASON": e.reason]
        let dropped: Bool = cond.withLock {
            guard queue.count < maxQueued else { return true }
            queue.append(env)
            cond.signal()
            return false
        }
        if dropped { log("event=hook_dropped hook_event=\(e.event) reason=\"more than \(maxQueued) hook runs waiting\"") }
    }

    public func stop() {
        cond.withLock {
            stopped = true
            cond.broadcast()
        }
    }

    private func run() {
        while true {
            let next: [String: String]? = cond.withLock {
                while queue.isEmpty && !stopped { cond.wait() }
                return stopped ? nil : queue.removeFirst()
            }
            guard let env = next else { return }
            runOnce(env)
        }
    }

    /// Runs the command in a process group of its own, so that a timeout kills it and
    /// everything it started.
    private func runOnce(_ env: [String: String]) {
        let event = env["TANDEM_EVENT"] ?? "?"
        let environment = ProcessInfo.processInfo.environment.merging(env) { _, new in new }.map { "\($0)=\($1)" }
        var attributes = posix_spawnattr_t()
        posix_spawnattr_init(&attributes)
        defer { posix_spawnattr_destroy(&attributes) }
        posix_spawnattr_setflags(&attributes, Int16(POSIX_SPAWN_SETPGROUP))
        posix_spawnattr_setpgroup(&attributes, 0)
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
        let argv: [UnsafeMutablePointer<CChar>?] = [strdup("/bin/sh"), strdup("-c"), strdup(command), nil]
        let envp: [UnsafeMutablePointer<CChar>?] = environment.map { strdup($0) } + [nil]
        defer { for p in argv + envp { free(p) } }
        var pid: pid_t = 0
        let start = monotonicNanoseconds()
        let rc = posix_spawn(&pid, "/bin/sh", &actions, &attributes, argv, envp)
        guard rc == 0 else {
            log("event=hook_failed hook_event=\(event) reason=\"cannot start /bin/sh: \(String(cString: strerror(rc)))\"")
            return
        }
        let deadline = start + UInt64(timeoutMilliseconds) * 1_000_000
        var status: Int32 = 0
        while true {
            let r = waitpid(pid, &status, WNOHANG)
            if r == pid { break }
            if r < 0 && errno != EINTR { break }
            if monotonicNanoseconds() >= deadline {
                kill(-pid, SIGKILL)
                while waitpid(pid, &status, 0) < 0 && errno == EINTR {}
                log("event=hook_failed hook_event=\(event) reason=\"killed after \(timeoutMilliseconds) ms\"")
                return
            }
            usleep(5_000)
        }
        let ms = (monotonicNanoseconds() - start) / 1_000_000
        // WIFEXITED / WEXITSTATUS, which Swift does not import as functions.
        let exited = status & 0x7f == 0
        let code = (status >> 8) & 0xff
        if !exited || code != 0 {
            log("event=hook_failed hook_event=\(event) exit_status=\(exited ? code : -1) milliseconds=\(ms)")
        } else {
            log("event=hook_ran hook_event=\(event) milliseconds=\(ms)")
        }
    }
}
