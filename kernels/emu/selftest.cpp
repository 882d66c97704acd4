// Unit tests of the CPU emulation itself (TOFFEE_EMU builds):
//   extern "C" int toffee_emu_selftest(char* report, size_t len)  ->  number of failures, short report.
// The fragment tables below are written from the PTX ISA text ("Matrix Fragments for mma.m16n8k16 with
// floating point type", and ldmatrix), independently of emu.h's code; every test runs as a kernel launched
// through the same registry launcher the real kernels use (TOFFEE_EMU_KERNEL).
#include "emu.h"
#include "tensor_core.cuh"

#include <string>

namespace {

// ---- PTX ISA tables -------------------------------------------------------------------------------------
// mma.m16n8k16, .f16/.bf16 multiplicands, f32 accumulators. groupID = lane >> 2, threadID_in_group = lane % 4.
// A: a0..a7 in four .f16x2 registers (element i is register i/2, half i%2, low half first)
//    row = groupID for i in {0,1,4,5}, groupID + 8 otherwise
//    col = threadID_in_group*2 + (i & 1) for i < 4, threadID_in_group*2 + (i & 1) + 8 for i >= 4
// B: b0..b3 in two .f16x2 registers
//    row = threadID_in_group*2 + (i & 1) for i < 2, threadID_in_group*2 + (i & 1) + 8 for i >= 2
//    col = groupID
// C/D: c0..c3
//    row = groupID for i < 2, groupID + 8 otherwise;  col = threadID_in_group*2 + (i & 1)
struct RC { int row, col; };
RC a_elem(int lane, int i) {
    int g = lane >> 2, t = lane % 4;
    int row = (i < 2 || (i >= 4 && i < 6)) ? g : g + 8;
    int col = t * 2 + (i & 1) + (i >= 4 ? 8 : 0);
    return {row, col};
}
RC b_elem(int lane, int i) {
    int g = lane >> 2, t = lane % 4;
    return {t * 2 + (i & 1) + (i >= 2 ? 8 : 0), g};
}
RC c_elem(int lane, int i) {
    int g = lane >> 2, t = lane % 4;
    return {i < 2 ? g : g + 8, t * 2 + (i & 1)};
}
// ldmatrix.m8n8.x4.b16: threads 8i..8i+7 supply the addresses of rows 0..7 of matrix i; each thread receives,
// in register i, row lane/4 and columns 2*(lane%4), 2*(lane%4)+1 of matrix i (low half first); with .trans
// it receives the same positions of the transposed matrix, i.e. rows 2*(lane%4), 2*(lane%4)+1 of column lane/4.

// ---- test kernels -----------------------------------------------------------------------------------------
template <typename T>
void k_mma(const float* A, const float* B, const float* C, float* out) {
    int lane = threadIdx.x;
    uint32_t a[4], b[2];
    uint16_t ah[8], bh[4];
    for (int i = 0; i < 8; ++i) {
        RC e = a_elem(lane, i);
        T v = from_f<T>(A[e.row * 16 + e.col]);
        memcpy(&ah[i], &v, 2);
    }
    for (int i = 0; i < 4; ++i) {
        RC e = b_elem(lane, i);
        T v = from_f<T>(B[e.row * 8 + e.col]);
        memcpy(&bh[i], &v, 2);
    }
    for (int r = 0; r < 4; ++r) a[r] = ah[2 * r] | ((uint32_t)ah[2 * r + 1] << 16);
    for (int r = 0; r < 2; ++r) b[r] = bh[2 * r] | ((uint32_t)bh[2 * r + 1] << 16);
    float c[4];
    for (int i = 0; i < 4; ++i) {
        RC e = c_elem(lane, i);
        c[i] = C[e.row * 8 + e.col];
    }
    tc::Mma<T>::run(c, a, b[0], b[1]);
    for (int i = 0; i < 4; ++i) out[lane * 4 + i] = c[i];
}
void k_mma_f16(const float* A, const float* B, const float* C, float* out) { k_mma<__half>(A, B, C, out); }
void k_mma_bf16(const float* A, const float* B, const float* C, float* out) { k_mma<__nv_bfloat16>(A, B, C, out); }

// Matrix i, row r, column c of the ldmatrix test: a distinct 16-bit pattern.
uint16_t ld_val(int i, int r, int c) { return (uint16_t)(0x1000 * (i + 1) + 0x10 * r + c); }
constexpr int kLdPitch = 48;  // bytes between stored rows (16-aligned, rows of different matrices interleaved)
int ld_row_off(int i, int r) { return (r * 4 + (3 - i)) * kLdPitch + 16; }

void k_ldmatrix(int trans, int bad_lane, uint32_t* out) {
    unsigned char* sm = ::emu::dyn_smem();
    int lane = threadIdx.x;
    if (lane == 0)
        for (int i = 0; i < 4; ++i)
            for (int r = 0; r < 8; ++r)
                for (int c = 0; c < 8; ++c) {
                    uint16_t v = ld_val(i, r, c);
                    memcpy(sm + ld_row_off(i, r) + 2 * c, &v, 2);
                }
    __syncwarp();
    uint32_t addr = tc::smem_addr(sm + ld_row_off(lane / 8, lane % 8));
    if (lane == bad_lane) addr = tc::smem_addr(sm) + 4096;  // past the end of a 2 KiB launch
    uint32_t r[4];
    if (trans) tc::ldsm_x4_t(r, addr);
    else tc::ldsm_x4(r, addr);
    for (int i = 0; i < 4; ++i) out[lane * 4 + i] = r[i];
}

// cp.async: flags[0..] record what the thread sees before and after each wait.
void k_cp_async(const uint4* src, int* flags) {
    unsigned char* sm = ::emu::dyn_smem();
    auto all = [&](int off, unsigned char v) {
        for (int b = 0; b < 16; ++b)
            if (sm[off + b] != v) return 0;
        return 1;
    };
    auto same = [&](int off, const uint4* s) { return memcmp(sm + off, s, 16) == 0 ? 1 : 0; };
    tc::cp_async16(tc::smem_addr(sm + 0), src, true);
    tc::cp_async16(tc::smem_addr(sm + 16), src, false);  // src-size 0: zero fill
    tc::cp_async_commit();
    tc::cp_async16(tc::smem_addr(sm + 32), src + 1, true);
    tc::cp_async_commit();
    flags[0] = all(0, 0xff) && all(16, 0xff) && all(32, 0xff);  // nothing landed yet (copy-at-wait)
    flags[1] = same(0, src) && all(16, 0) && same(32, src + 1);  // everything landed (copy-at-issue)
    tc::cp_async_wait<1>();
    flags[2] = same(0, src) && all(16, 0) && all(32, 0xff);  // first group landed, second not
    tc::cp_async_wait<0>();
    flags[3] = same(0, src) && all(16, 0) && same(32, src + 1);
}

void k_deadlock(int* out) {
    if (threadIdx.x < 32) __syncthreads();
    out[threadIdx.x] = 1;
}

void k_shfl(int width, int* out) {
    int lane = threadIdx.x;
    int v = lane * 3 + 1;
    float f = (float)lane + 0.5f;
    out[lane * 4 + 0] = __shfl_xor_sync(0xffffffffu, v, 5);
    out[lane * 4 + 1] = __shfl_down_sync(0xffffffffu, v, 3, width);
    out[lane * 4 + 2] = __shfl_sync(0xffffffffu, v, 7, width);
    out[lane * 4 + 3] = (int)(2.0f * __shfl_xor_sync(0xffffffffu, f, 17));
}

void k_partial_mask(int* out) { out[threadIdx.x] = __shfl_sync(0x0000ffffu, (int)threadIdx.x, 0); }

const emu_kernel kTests[] = {TOFFEE_EMU_KERNEL(k_mma_f16) TOFFEE_EMU_KERNEL(k_mma_bf16) TOFFEE_EMU_KERNEL(k_ldmatrix)
                                 TOFFEE_EMU_KERNEL(k_cp_async) TOFFEE_EMU_KERNEL(k_deadlock) TOFFEE_EMU_KERNEL(k_shfl)
                                     TOFFEE_EMU_KERNEL(k_partial_mask)};

struct Report {
    std::string text;
    int checks = 0, failures = 0;
    void check(bool ok, const std::string& what) {
        checks++;
        if (!ok) {
            failures++;
            text += "FAIL " + what + "\n";
        }
    }
};

int launch(const char* name, unsigned threads, uint32_t smem, const emu_mode& mode, std::vector<const void*> args,
           const char* kinds, std::string* err) {
    for (const auto& k : kTests)
        if (strcmp(k.name, name) == 0) {
            char buf[512];
            int rc = k.launch(emu_dim3{1, 1, 1}, emu_dim3{threads, 1, 1}, smem, &mode, args.data(), kinds,
                              args.size(), buf, sizeof buf);
            if (err) *err = rc ? buf : "";
            return rc;
        }
    if (err) *err = std::string("no test kernel ") + name;
    return -1;
}

void test_mma(Report& rep, bool bf16, const emu_mode& mode) {
    // Distinct integers (exact in f16 and bf16: |v| <= 256), shuffled so that any permuted or transposed
    // layout changes the product; every sum stays far below 2^24, so the expected D is exact in f32.
    std::mt19937 rng(bf16 ? 7 : 3);
    std::vector<float> A(256), B(128), C(128), out(128, 0.0f);
    for (int i = 0; i < 256; ++i) A[i] = (float)(i - 128);
    for (int i = 0; i < 128; ++i) B[i] = (float)(i - 64), C[i] = 0.25f * (float)(i - 50);
    std::shuffle(A.begin(), A.end(), rng);
    std::shuffle(B.begin(), B.end(), rng);
    std::string err;
    const float *pa = A.data(), *pb = B.data(), *pc = C.data();
    float* po = out.data();
    int rc = launch(bf16 ? "k_mma_bf16" : "k_mma_f16", 32, 0, mode, {&pa, &pb, &pc, &po}, "pppp", &err);
    std::string name = bf16 ? "mma.m16n8k16 bf16" : "mma.m16n8k16 f16";
    rep.check(rc == 0, name + " launch: " + err);
    int bad = 0;
    for (int lane = 0; lane < 32; ++lane)
        for (int i = 0; i < 4; ++i) {
            RC e = c_elem(lane, i);
            double d = C[e.row * 8 + e.col];
            for (int k = 0; k < 16; ++k) d += (double)A[e.row * 16 + k] * B[k * 8 + e.col];
            bad += out[lane * 4 + i] != (float)d;
        }
    rep.check(bad == 0, name + ": " + std::to_string(bad) + " of 128 accumulator elements differ from A*B+C");
}

void test_ldmatrix(Report& rep, bool trans, const emu_mode& mode) {
    std::vector<uint32_t> out(128, 0);
    int t = trans, bad_lane = -1;
    uint32_t* po = out.data();
    std::string err, name = trans ? "ldmatrix.x4.trans" : "ldmatrix.x4";
    int rc = launch("k_ldmatrix", 32, 2048, mode, {&t, &bad_lane, &po}, "iip", &err);
    rep.check(rc == 0, name + " launch: " + err);
    int bad = 0;
    for (int lane = 0; lane < 32; ++lane)
        for (int i = 0; i < 4; ++i) {
            uint16_t lo, hi;
            if (!trans) lo = ld_val(i, lane / 4, 2 * (lane % 4)), hi = ld_val(i, lane / 4, 2 * (lane % 4) + 1);
            else lo = ld_val(i, 2 * (lane % 4), lane / 4), hi = ld_val(i, 2 * (lane % 4) + 1, lane / 4);
            bad += out[lane * 4 + i] != (lo | ((uint32_t)hi << 16));
        }
    rep.check(bad == 0, name + ": " + std::to_string(bad) + " of 128 registers differ from the ISA table");
}

}  // namespace

extern "C" int toffee_emu_selftest(char* report, size_t len) {
    Report rep;
    const emu_mode in_order{0, 0, 0}, skewed{0, 3, 1}, at_wait{1, 0, 0};
    std::string err;

    // (a) mma fragment layouts, f16 and bf16, in two schedules
    for (const emu_mode* m : {&in_order, &skewed}) {
        test_mma(rep, false, *m);
        test_mma(rep, true, *m);
    }
    // (b) ldmatrix x4 and x4.trans
    for (const emu_mode* m : {&in_order, &skewed}) {
        test_ldmatrix(rep, false, *m);
        test_ldmatrix(rep, true, *m);
    }
    // (c) cp.async in both modes
    {
        alignas(16) uint32_t src[8] = {0x11111111u, 0x22222222u, 0x33333333u, 0x44444444u,
                                       0x55555555u, 0x66666666u, 0x77777777u, 0x88888888u};
        int flags[4] = {-1, -1, -1, -1};
        const void* ps = src;
        int* pf = flags;
        int rc = launch("k_cp_async", 1, 64, at_wait, {&ps, &pf}, "pp", &err);
        rep.check(rc == 0, "cp.async (copy at wait) launch: " + err);
        rep.check(flags[0] == 1, "cp.async copy-at-wait: data visible before cp.async.wait_group");
        rep.check(flags[2] == 1, "cp.async copy-at-wait: wait_group 1 did not land exactly the older group");
        rep.check(flags[3] == 1, "cp.async copy-at-wait: wait_group 0 did not land everything (or no zero fill)");
        int rc2 = launch("k_cp_async", 1, 64, in_order, {&ps, &pf}, "pp", &err);
        rep.check(rc2 == 0, "cp.async (copy at issue) launch: " + err);
        rep.check(flags[1] == 1, "cp.async copy-at-issue: data (or src-size 0 zero fill) not there at issue");
    }
    // (d) __syncthreads reached by half the block: an error, not a hang or an abort
    for (const emu_mode* m : {&in_order, &skewed}) {
        std::vector<int> out(64, 0);
        int* po = out.data();
        int rc = launch("k_deadlock", 64, 0, *m, {&po}, "p", &err);
        rep.check(rc != 0 && err.find("__syncthreads") != std::string::npos && err.find("block 0,0,0") != std::string::npos,
                  "divergent __syncthreads not reported (got: " + err + ")");
    }
    // (e) ldmatrix past the end of shared memory
    {
        std::vector<uint32_t> out(128, 0);
        int t = 0, bad_lane = 13;
        uint32_t* po = out.data();
        int rc = launch("k_ldmatrix", 32, 2048, in_order, {&t, &bad_lane, &po}, "iip", &err);
        rep.check(rc != 0 && err.find("ldmatrix") != std::string::npos && err.find("thread 13") != std::string::npos,
                  "ldmatrix past the end of shared memory not reported (got: " + err + ")");
    }
    // (f) shuffles
    for (int width : {32, 8}) {
        std::vector<int> out(128, 0);
        int* po = out.data();
        int rc = launch("k_shfl", 32, 0, skewed, {&width, &po}, "ip", &err);
        rep.check(rc == 0, "shuffle launch: " + err);
        int bad = 0;
        for (int l = 0; l < 32; ++l) {
            auto v = [](int lane) { return lane * 3 + 1; };
            int base = l - l % width;
            int down = (l % width) + 3 < width ? v(l + 3) : v(l);
            bad += out[l * 4 + 0] != v(l ^ 5);
            bad += out[l * 4 + 1] != down;
            bad += out[l * 4 + 2] != v(base + 7 % width);
            bad += out[l * 4 + 3] != 2 * (l ^ 17) + 1;
        }
        rep.check(bad == 0, "shuffles (width " + std::to_string(width) + "): " + std::to_string(bad) + " wrong values");
    }
    // the launcher's own checks
    {
        int* po = nullptr;
        int rc = launch("k_partial_mask", 32, 0, in_order, {&po}, "p", &err);
        rep.check(rc != 0 && err.find("partial mask") != std::string::npos, "partial-mask shuffle not reported (got: " + err + ")");
        float f = 1.0f;
        rc = launch("k_deadlock", 64, 0, in_order, {&f}, "f", &err);
        rep.check(rc != 0 && err.find("argument 0") != std::string::npos, "argument kind mismatch not reported (got: " + err + ")");
        rc = launch("k_deadlock", 0, 0, in_order, {&po}, "p", &err);
        rep.check(rc != 0 && err.find("invalid launch") != std::string::npos, "empty block not reported (got: " + err + ")");
        rc = launch("k_deadlock", 64, 0, in_order, {&po, &po}, "pp", &err);
        rep.check(rc != 0 && err.find("arguments given") != std::string::npos, "wrong argument count not reported (got: " + err + ")");
    }

    std::string head = "toffee emu selftest: " + std::to_string(rep.checks - rep.failures) + "/" +
                       std::to_string(rep.checks) + " checks passed\n";
    std::string all = head + rep.text;
    if (report && len) {
        size_t n = std::min(len - 1, all.size());
        memcpy(report, all.data(), n);
        report[n] = 0;
    }
    return rep.failures;
}
