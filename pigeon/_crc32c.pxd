# CRC-32C, the checksum of log records (docs/storage.md, "The format") and the hash of a topic's
# slot (docs/cluster.md, "Slots"): the core (pigeon/core/log.pxi) and replication's walks
# (pigeon/cluster/_records.pxd) compute it with these. Every module that cimports this calls
# crc32c_choose() once, at its import, before any use: the walks run on several threads without
# the GIL, and a choice made on first use could be seen by one thread half-made.

from libc.stdint cimport uint32_t


cdef extern from *:
    """
    /* CRC-32C (Castagnoli: iSCSI, ext4, Kafka record batches) with the CPU's instruction:
       SSE4.2 on x86-64, the CRC extension on AArch64, chosen at run time. CPUs without it
       take the bitwise loop: slow, but they are rare and it is obviously right. */
    #include <stdint.h>
    #include <string.h>
    static uint32_t pigeon_crc32c_bitwise(uint32_t crc, const unsigned char *p, size_t n) {
        crc = ~crc;
        while (n--) {
            crc ^= *p++;
            for (int k = 0; k < 8; k++)
                crc = (crc >> 1) ^ (0x82F63B78u & (0u - (crc & 1u)));
        }
        return ~crc;
    }
    #if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
    #include <nmmintrin.h>
    __attribute__((target("sse4.2")))
    static uint32_t pigeon_crc32c_hardware(uint32_t crc, const unsigned char *p, size_t n) {
        uint64_t c = ~crc & 0xFFFFFFFFu;
        uint64_t v;
        uint32_t c32;
        while (n >= 8) { memcpy(&v, p, 8); c = _mm_crc32_u64(c, v); p += 8; n -= 8; }
        c32 = (uint32_t)c;
        while (n--) c32 = _mm_crc32_u8(c32, *p++);
        return ~c32;
    }
    static int pigeon_crc32c_has_hardware(void) {
        __builtin_cpu_init();
        return __builtin_cpu_supports("sse4.2");
    }
    #elif defined(__aarch64__) && defined(__linux__) && (defined(__GNUC__) || defined(__clang__))
    #include <arm_acle.h>
    #include <sys/auxv.h>
    #include <asm/hwcap.h>
    __attribute__((target("+crc")))
    static uint32_t pigeon_crc32c_hardware(uint32_t crc, const unsigned char *p, size_t n) {
        uint64_t v;
        crc = ~crc;
        while (n >= 8) { memcpy(&v, p, 8); crc = __crc32cd(crc, v); p += 8; n -= 8; }
        while (n--) crc = __crc32cb(crc, *p++);
        return ~crc;
    }
    static int pigeon_crc32c_has_hardware(void) { return (getauxval(AT_HWCAP) & HWCAP_CRC32) != 0; }
    #else
    static uint32_t pigeon_crc32c_hardware(uint32_t crc, const unsigned char *p, size_t n) {
        return pigeon_crc32c_bitwise(crc, p, n);
    }
    static int pigeon_crc32c_has_hardware(void) { return 0; }
    #endif
    static uint32_t (*pigeon_crc32c)(uint32_t, const unsigned char *, size_t) = NULL;
    static void pigeon_crc32c_choose(int hardware) {
        pigeon_crc32c = hardware && pigeon_crc32c_has_hardware() ? pigeon_crc32c_hardware
                                                                 : pigeon_crc32c_bitwise;
    }
    """
    uint32_t crc32c_run "pigeon_crc32c"(uint32_t crc, const unsigned char *p, size_t n) noexcept nogil
    uint32_t crc32c_bitwise "pigeon_crc32c_bitwise"(uint32_t crc, const unsigned char *p, size_t n) noexcept nogil
    int crc32c_has_hardware "pigeon_crc32c_has_hardware"() noexcept nogil
    void crc32c_choose "pigeon_crc32c_choose"(int hardware) noexcept nogil
