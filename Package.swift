// swift-tools-version:6.0
import PackageDescription

let strict: [SwiftSetting] = [
    .enableUpcomingFeature("ExistentialAny"),
]

let package = Package(
    name: "Tandem",
    platforms: [.macOS(.v14)],
    products: [
        .executable(name: "tandemd", targets: ["tandemd"]),
        .executable(name: "tandemctl", targets: ["tandemctl"]),
        .executable(name: "tandem-sim", targets: ["tandem-sim"]),
        .executable(name: "tandem-bench", targets: ["tandem-bench"]),
        .executable(name: "tandem-fuzz-frames", targets: ["tandem-fuzz-frames"]),
        .executable(name: "tandem-drill", targets: ["tandem-drill"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.5.0"),
        .package(url: "https://github.com/hummingbird-project/hummingbird", from: "2.0.0"),
        .package(url: "https://github.com/apple/swift-nio", from: "2.70.0"),
        .package(url: "https://github.com/apple/swift-nio-extras", from: "1.20.0"),
        .package(url: "https://github.com/apple/swift-metrics", from: "2.4.1"),
        .package(url: "https://github.com/swift-server/swift-prometheus", from: "2.0.0"),
        .package(url: "https://github.com/apple/swift-log", from: "1.5.0"),
        .package(url: "https://github.com/apple/swift-http-types", from: "1.0.0"),
        .package(url: "https://github.com/swift-server/swift-service-lifecycle", from: "2.0.0"),
        // Tests only: reads docs/openapi.yaml to check the running server against it.
        .package(url: "https://github.com/jpsim/Yams", from: "5.0.1"),
    ],
    targets: [
        // System C libraries, each behind a small shim header.
        .systemLibrary(
            name: "CLZ4", path: "Sources/CLZ4", pkgConfig: "liblz4",
            providers: [.apt(["liblz4-dev"])]),
        .systemLibrary(
            name: "CSQLite", path: "Sources/CSQLite", pkgConfig: "sqlite3",
            providers: [.apt(["libsqlite3-dev"])]),
        .systemLibrary(
            name: "COpenSSL", path: "Sources/COpenSSL", pkgConfig: "openssl",
            providers: [.apt(["libssl-dev"])]),
        // CRC32C with the SSE4.2 instruction where the CPU has it, a table otherwise.
        .target(
            name: "CCRC32C", path: "Sources/CCRC32C",
            cSettings: [.unsafeFlags(["-O3"])]),

        // File-system constants Swift's Glibc module leaves out (O_DIRECT).
        .target(name: "CFileIO", path: "Sources/CFileIO"),
        // SQLite's default page cache behind a wrapper that skips truncations with nothing
        // to drop (pagecache.c says why).
        .target(name: "CSQLitePageCache", path: "Sources/CSQLitePageCache",
                linkerSettings: [.linkedLibrary("sqlite3")]),

        .target(name: "TandemModel", dependencies: ["CCRC32C"], swiftSettings: strict),
        .target(name: "TandemWAL", dependencies: ["TandemModel", "CFileIO"], swiftSettings: strict),
        // The pure protocol core: no I/O, clock, thread, lock or random number inside.
        .target(name: "TandemCore", dependencies: ["TandemModel"], swiftSettings: strict),
        // Peer transport: mutual TLS (system OpenSSL), framing, LZ4 record batches.
        .target(name: "TandemTransport", dependencies: ["TandemCore", "COpenSSL", "CLZ4"], swiftSettings: strict),
        // A site's configuration file: a TOML reader and the schema, with errors that name the key.
        .target(name: "TandemConfig", dependencies: ["TandemCore"], swiftSettings: strict),
        // A running site: the core driven by a real clock, files and sockets.
        .target(name: "TandemNode", dependencies: ["TandemCore", "TandemStore", "TandemWAL", "TandemTransport"], swiftSettings: strict),
        // The site's HTTP API (Hummingbird): health probes and status.
        .target(name: "TandemHTTP", dependencies: ["TandemNode", "TandemStore", .product(name: "Hummingbird", package: "hummingbird"),
                                                   .product(name: "HummingbirdCore", package: "hummingbird"),
                                                   .product(name: "NIOCore", package: "swift-nio"),
                                                   .product(name: "HTTPTypes", package: "swift-http-types"),
                                                   .product(name: "NIOHTTPTypes", package: "swift-nio-extras"),
                                                   .product(name: "Logging", package: "swift-log"),
                                                   .product(name: "CoreMetrics", package: "swift-metrics"),
                                                   .product(name: "Prometheus", package: "swift-prometheus")], swiftSettings: strict),
        // Fire drills on real tandemd processes: a loopback cluster launcher, a TCP proxy to
        // cut sites off, a telehealth workload and the checks (no acknowledged write lost,
        // linearizable reads, convergence).
        .target(name: "TandemDrill", dependencies: ["TandemHTTP", "TandemConfig"], swiftSettings: strict),
        // The deterministic disaster simulator: network, clocks, disks and checkers.
        // Single-threaded and hot: dynamic exclusivity checks on its classes cost ~6% of a run.
        .target(name: "TandemSimulation", dependencies: ["TandemCore"],
                swiftSettings: strict + [.unsafeFlags(["-enforce-exclusivity=unchecked"])]),
        .target(
            name: "TandemStore",
            dependencies: ["TandemModel", "TandemWAL", "CSQLite", "CSQLitePageCache", "CLZ4", "COpenSSL"],
            swiftSettings: strict),

        .executableTarget(
            name: "tandemd",
            dependencies: ["TandemStore", "TandemConfig", "TandemNode", "TandemTransport", "TandemHTTP", "TandemWAL",
                           .product(name: "ArgumentParser", package: "swift-argument-parser"),
                           .product(name: "Hummingbird", package: "hummingbird"),
                           .product(name: "Logging", package: "swift-log"),
                           .product(name: "ServiceLifecycle", package: "swift-service-lifecycle")],
            path: "Sources/tandemd", swiftSettings: strict),
        .executableTarget(
            name: "tandemctl",
            dependencies: ["TandemStore", "TandemConfig", "TandemHTTP", "TandemNode", "TandemTransport",
                           .product(name: "ArgumentParser", package: "swift-argument-parser")],
            path: "Sources/tandemctl", swiftSettings: strict),
        .executableTarget(
            name: "tandem-sim",
            dependencies: ["TandemSimulation", .product(name: "ArgumentParser", package: "swift-argument-parser")],
            path: "Sources/tandem-sim", swiftSettings: strict),
        .executableTarget(
            name: "tandem-bench",
            dependencies: ["TandemWAL", "TandemStore", "TandemSimulation", "TandemTransport", "TandemDrill",
                           .product(name: "ArgumentParser", package: "swift-argument-parser")],
            path: "Sources/tandem-bench", swiftSettings: strict),

        .executableTarget(
            name: "tandem-drill",
            dependencies: ["TandemDrill", .product(name: "ArgumentParser", package: "swift-argument-parser")],
            path: "Sources/tandem-drill", swiftSettings: strict),

        // libFuzzer target for the frame decoder (docs/WIRE.md); a normal build replays files.
        .executableTarget(name: "tandem-fuzz-frames", dependencies: ["TandemTransport"], path: "Sources/tandem-fuzz-frames",
                          swiftSettings: strict),

        .testTarget(name: "TandemWALTests", dependencies: ["TandemWAL"], swiftSettings: strict),
        .testTarget(name: "TandemStoreTests", dependencies: ["TandemStore"], swiftSettings: strict),
        .testTarget(name: "TandemCoreTests", dependencies: ["TandemCore"], swiftSettings: strict),
        .testTarget(name: "TandemTransportTests", dependencies: ["TandemTransport", "TandemDrill"], swiftSettings: strict),
        .testTarget(name: "TandemConfigTests", dependencies: ["TandemConfig"], swiftSettings: strict),
        .testTarget(name: "TandemNodeTests", dependencies: ["TandemNode", "TandemHTTP", "TandemStore", .product(name: "Yams", package: "Yams")], swiftSettings: strict),
        .testTarget(name: "TandemDrillTests", dependencies: ["TandemDrill", "TandemConfig"], swiftSettings: strict),
        .testTarget(name: "TandemSimulationTests", dependencies: ["TandemSimulation"], swiftSettings: strict),
        // The benchmark's own load generator: its HTTP parser decides what counts as a write.
        .testTarget(name: "TandemBenchTests", dependencies: ["tandem-bench"], swiftSettings: strict),
    ],
    swiftLanguageModes: [.v6]
)
