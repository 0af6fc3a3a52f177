/* topoopt's compiled engine: the loops that cost too much as many small numpy/torch calls.
 *
 * - prim: Prim's algorithm on a dense float32 matrix of squared distances. The same loop in
 *   numpy costs ~5 us an iteration in call overhead (benchmarks/h0.py measures both).
 * - small_tree: a small cloud's tree: its Gram product (one triangle), the squared distances,
 *   the near pairs recomputed exactly in double, then Prim. As ~15 torch operations this cost
 *   6x the Gram product at 100x784 (benchmarks/RESULTS.md).
 * - measure, scatter: the forward (lengths, optionally sorted, and unit directions) and backward
 *   (the norm's gradient scattered to both endpoints) of a tree's edge lengths.
 * - metric_slope: a metric of H0 bars and its gradient per bar, for the one-node penalty.
 * - layer_term: one layer of the one-node penalty (its deaths, metric, term and gradient).
 * - exact_terms: a training step's exact tree lookups and penalty terms, every layer in one call.
 * - block_distances: a row block of the general search's squared distances and near pairs.
 * - same_bytes: TreeCache's test that a cloud is the one its tree was searched on.
 * Lengths are summed in double from the float32 or float64 points: exact over float32's whole
 * range, where a float32 squared norm under- or overflows.
 * Every function checks its buffers' sizes and indices and runs without the GIL. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* Reductions vectorise only when the compiler may reorder the sum (-fopenmp-simd, set by
 * setup.py; no OpenMP runtime is used). The order changes the last bits of a length, not more. */
#define PRAGMA(x) _Pragma(#x)
#define SIMD_SUM(v) PRAGMA(omp simd reduction(+ : v))

/* The arithmetic loops get AVX-512 and AVX2 copies beside the baseline one, chosen at load time
 * (GCC's function multi-versioning; Linux x86-64 only, elsewhere the baseline alone). */
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define VECTORISED __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define VECTORISED
#endif

static void prim_edges(const float *d, Py_ssize_t n, int64_t *eu, int64_t *ev,
                       float *key, int64_t *parent, int64_t *frontier) {
    Py_ssize_t size = n - 1;
    for (Py_ssize_t i = 0; i < size; i++) {
        frontier[i] = i + 1;
        key[i] = d[i + 1];
        parent[i] = 0;
    }
    for (Py_ssize_t k = 0; k < n - 1; k++) {
        Py_ssize_t best = 0;
        float best_key = key[0];
        for (Py_ssize_t i = 1; i < size; i++) {
            if (key[i] < best_key) { best_key = key[i]; best = i; }
        }
        int64_t vertex = frontier[best];
        eu[k] = parent[best];
        ev[k] = vertex;
        size--;
        frontier[best] = frontier[size];
        key[best] = key[size];
        parent[best] = parent[size];
        const float *row = d + (size_t)vertex * (size_t)n;
        for (Py_ssize_t i = 0; i < size; i++) {
            float candidate = row[frontier[i]];
            if (candidate < key[i]) { key[i] = candidate; parent[i] = vertex; }
        }
    }
}

/* Prim with its scratch space; 0 on success, -1 (MemoryError set, GIL needed) on failure. */
static int prim_with_scratch(const float *d, Py_ssize_t n, int64_t *eu, int64_t *ev) {
    float *key = malloc((size_t)(n - 1) * sizeof(float));
    int64_t *parent = malloc((size_t)(n - 1) * sizeof(int64_t));
    int64_t *frontier = malloc((size_t)(n - 1) * sizeof(int64_t));
    int ok = key && parent && frontier;
    if (ok) {
        Py_BEGIN_ALLOW_THREADS
        prim_edges(d, n, eu, ev, key, parent, frontier);
        Py_END_ALLOW_THREADS
    }
    free(key); free(parent); free(frontier);
    if (!ok) { PyErr_NoMemory(); return -1; }
    return 0;
}

static int expect(int condition, const char *message) {
    if (!condition) PyErr_SetString(PyExc_ValueError, message);
    return condition;
}

/* prim(matrix: float32[n*n], n, u: int64[n-1] out, v: int64[n-1] out) */
static PyObject *prim(PyObject *self, PyObject *args) {
    Py_buffer matrix, u, v;
    Py_ssize_t n;
    if (!PyArg_ParseTuple(args, "y*nw*w*", &matrix, &n, &u, &v)) return NULL;
    PyObject *result = NULL;
    if (expect(n >= 2 && matrix.len == (Py_ssize_t)(n * n * sizeof(float)) &&
               u.len == (Py_ssize_t)((n - 1) * sizeof(int64_t)) && v.len == u.len,
               "prim: expected an n*n float32 matrix and two int64[n-1] outputs") &&
        prim_with_scratch((const float *)matrix.buf, n, (int64_t *)u.buf, (int64_t *)v.buf) == 0) {
        result = Py_None;
        Py_INCREF(result);
    }
    PyBuffer_Release(&matrix);
    PyBuffer_Release(&u);
    PyBuffer_Release(&v);
    return result;
}

VECTORISED static double squared_difference(const float *a, const float *b, Py_ssize_t d) {
    double total = 0.0;
    SIMD_SUM(total)
    for (Py_ssize_t k = 0; k < d; k++) {
        double diff = (double)a[k] - (double)b[k];
        total += diff * diff;
    }
    return total;
}

/* g[i*n+j] = x_i·x_j for i <= j (the upper triangle; the lower one is left as it was), in
 * blocks of 4 rows by 4 columns so that each loaded chunk of a row serves four products. */
VECTORISED static void gram_upper(const float *x, Py_ssize_t n, Py_ssize_t d, float *g) {
    Py_ssize_t i = 0;
    for (; i + 4 <= n; i += 4) {
        const float *a0 = x + i * d, *a1 = a0 + d, *a2 = a1 + d, *a3 = a2 + d;
        Py_ssize_t j = i;
        for (; j + 4 <= n; j += 4) {
            const float *b0 = x + j * d, *b1 = b0 + d, *b2 = b1 + d, *b3 = b2 + d;
            float s00 = 0, s01 = 0, s02 = 0, s03 = 0, s10 = 0, s11 = 0, s12 = 0, s13 = 0;
            float s20 = 0, s21 = 0, s22 = 0, s23 = 0, s30 = 0, s31 = 0, s32 = 0, s33 = 0;
            PRAGMA(omp simd reduction(+ : s00, s01, s02, s03, s10, s11, s12, s13, s20, s21, s22, s23, s30, s31, s32, s33))
            for (Py_ssize_t k = 0; k < d; k++) {
                float c0 = b0[k], c1 = b1[k], c2 = b2[k], c3 = b3[k];
                s00 += a0[k] * c0; s01 += a0[k] * c1; s02 += a0[k] * c2; s03 += a0[k] * c3;
                s10 += a1[k] * c0; s11 += a1[k] * c1; s12 += a1[k] * c2; s13 += a1[k] * c3;
                s20 += a2[k] * c0; s21 += a2[k] * c1; s22 += a2[k] * c2; s23 += a2[k] * c3;
                s30 += a3[k] * c0; s31 += a3[k] * c1; s32 += a3[k] * c2; s33 += a3[k] * c3;
            }
            float *r0 = g + i * n + j, *r1 = r0 + n, *r2 = r1 + n, *r3 = r2 + n;
            r0[0] = s00; r0[1] = s01; r0[2] = s02; r0[3] = s03;
            r1[0] = s10; r1[1] = s11; r1[2] = s12; r1[3] = s13;
            r2[0] = s20; r2[1] = s21; r2[2] = s22; r2[3] = s23;
            r3[0] = s30; r3[1] = s31; r3[2] = s32; r3[3] = s33;
        }
        for (; j < n; j++)
            for (Py_ssize_t r = 0; r < 4; r++) {
                const float *a = x + (i + r) * d, *b = x + j * d;
                float sum = 0;
                SIMD_SUM(sum)
                for (Py_ssize_t k = 0; k < d; k++) sum += a[k] * b[k];
                g[(i + r) * n + j] = sum;
            }
    }
    for (; i < n; i++)
        for (Py_ssize_t j = i; j < n; j++) {
            const float *a = x + i * d, *b = x + j * d;
            float sum = 0;
            SIMD_SUM(sum)
            for (Py_ssize_t k = 0; k < d; k++) sum += a[k] * b[k];
            g[i * n + j] = sum;
        }
}

static Py_ssize_t small_tree_into(const float *p, Py_ssize_t n, Py_ssize_t d, double ratio, Py_ssize_t max_pairs,
                                  float *g, double *norms, float *key, int64_t *parent, int64_t *frontier,
                                  int64_t *u, int64_t *v) {
    gram_upper(p, n, d, g);
    double largest = 0.0;
    int finite = 1;  /* a NaN or infinite coordinate makes its row's squared norm NaN or infinite */
    for (Py_ssize_t i = 0; i < n; i++) {
        norms[i] = g[i * n + i];
        finite &= isfinite(norms[i]) != 0;
        if (norms[i] > largest) largest = norms[i];
    }
    /* The matrix holds squared distances times scale, a power of two that brings the largest
     * norm near 1: exact, and the same resolution for close pairs as the centred search has. */
    if (!(finite && largest > 1e-30 && largest < 1e30)) return -1;
    double scale = ldexp(1.0, -(int)lrint(log2(largest)));
    Py_ssize_t near = 0;
    /* Squared distances of the upper triangle, mirrored; the pairs to recompute marked -1. */
    for (Py_ssize_t i = 0; i < n; i++) {
        g[i * n + i] = 0.0f;
        for (Py_ssize_t j = i + 1; j < n; j++) {
            double sum = norms[i] + norms[j];
            double s = sum - 2.0 * (double)g[i * n + j];
            float value = (float)((s > 0.0 ? s : 0.0) * scale);
            if (!(sum > 1e-36 && s >= ratio * sum)) { near++; value = -1.0f; }
            g[i * n + j] = value;
            g[j * n + i] = value;
        }
    }
    if (near > max_pairs) return -1;
    /* Those pairs, exactly (rounded to float32 only at the end). */
    for (Py_ssize_t i = 0; near > 0 && i < n; i++)
        for (Py_ssize_t j = i + 1; j < n; j++)
            if (g[i * n + j] < 0.0f) {
                float value = (float)(squared_difference(p + i * d, p + j * d, d) * scale);
                g[i * n + j] = value;
                g[j * n + i] = value;
            }
    prim_edges(g, n, u, v, key, parent, frontier);
    return near;
}

/* small_tree(x: float32[n*d], n, d, ratio, max_pairs, scratch: float32[n*n], u: int64[n-1] out,
 *            v: int64[n-1] out) -> near pairs, or -1
 * The Gram product's upper triangle goes into `scratch` and becomes the squared distances
 * |a|²+|b|²−2a·b, mirrored, times a power of two that brings the largest squared norm near 1.
 * That identity loses digits for pairs closer than ratio·(|a|²+|b|²) (float32's error is ~6 eps
 * of that sum), and for pairs whose squared norms underflow: those pairs are recomputed in
 * double from `x`. A cloud whose largest squared norm is outside [1e-30, 1e30] (its float32
 * Gram product under- or overflows), or with more than max_pairs such pairs (copies, clusters,
 * a cloud far from the origin), returns -1 before any is recomputed: the caller's general search
 * (rescaled, centred, clusters handled) takes it. So does a cloud with a NaN or infinite
 * coordinate (callers check first; a tree of one is never made). Otherwise the tree's edges go
 * to u, v. Written here rather than around a BLAS product: half the products (one triangle), and
 * no thread pool to wake or stall (benchmarks/h0.py --small). */
static PyObject *small_tree(PyObject *self, PyObject *args) {
    Py_buffer x, scratch, u, v;
    Py_ssize_t n, d, max_pairs;
    double ratio;
    if (!PyArg_ParseTuple(args, "y*nndnw*w*w*", &x, &n, &d, &ratio, &max_pairs, &scratch, &u, &v)) return NULL;
    PyObject *result = NULL;
    double *norms = NULL;
    float *key = NULL;
    int64_t *parent = NULL, *frontier = NULL;
    if (!expect(n >= 2 && d >= 1 && scratch.len == (Py_ssize_t)(n * n * sizeof(float)) &&
                x.len == (Py_ssize_t)(n * d * sizeof(float)) &&
                u.len == (Py_ssize_t)((n - 1) * sizeof(int64_t)) && v.len == u.len,
                "small_tree: expected float32 n*d and n*n buffers and two int64[n-1] outputs")) goto done;
    norms = malloc((size_t)n * sizeof(double));
    key = malloc((size_t)n * sizeof(float));
    parent = malloc((size_t)n * sizeof(int64_t));
    frontier = malloc((size_t)n * sizeof(int64_t));
    if (!norms || !key || !parent || !frontier) { PyErr_NoMemory(); goto done; }
    Py_ssize_t near;
    Py_BEGIN_ALLOW_THREADS
    near = small_tree_into(x.buf, n, d, ratio, max_pairs, scratch.buf, norms, key, parent, frontier, u.buf, v.buf);
    Py_END_ALLOW_THREADS
    result = PyLong_FromSsize_t(near);
done:
    free(norms); free(key); free(parent); free(frontier);
    PyBuffer_Release(&x);
    PyBuffer_Release(&scratch);
    PyBuffer_Release(&u);
    PyBuffer_Release(&v);
    return result;
}

/* all_finite: no NaN or infinity (0·x is NaN exactly there); sum_squares: Σ x², in double. */
#define REDUCTIONS(T)                                                                           \
    VECTORISED static int all_finite_##T(const T *p, Py_ssize_t count) {                        \
        T total = 0;                                                                             \
        SIMD_SUM(total)                                                                          \
        for (Py_ssize_t k = 0; k < count; k++) total += (T)0 * p[k];                             \
        return total == (T)0;                                                                    \
    }                                                                                            \
    VECTORISED static double sum_squares_##T(const T *p, Py_ssize_t count) {                    \
        double total = 0.0;                                                                      \
        SIMD_SUM(total)                                                                          \
        for (Py_ssize_t k = 0; k < count; k++) total += (double)p[k] * (double)p[k];             \
        return total;                                                                            \
    }
REDUCTIONS(float)
REDUCTIONS(double)

/* sum_of_squares(points: T[count], itemsize) -> float; all_finite(points, itemsize) -> bool */
static PyObject *reduction(PyObject *args, int squares) {
    Py_buffer points;
    Py_ssize_t itemsize;
    if (!PyArg_ParseTuple(args, "y*n", &points, &itemsize)) return NULL;
    PyObject *result = NULL;
    if (expect((itemsize == 4 || itemsize == 8) && points.len % itemsize == 0,
               "expected a float32 or float64 buffer")) {
        Py_ssize_t count = points.len / itemsize;
        double total = 0.0;
        int finite = 1;
        Py_BEGIN_ALLOW_THREADS
        if (squares) total = itemsize == 4 ? sum_squares_float(points.buf, count) : sum_squares_double(points.buf, count);
        else finite = itemsize == 4 ? all_finite_float(points.buf, count) : all_finite_double(points.buf, count);
        Py_END_ALLOW_THREADS
        result = squares ? PyFloat_FromDouble(total) : PyBool_FromLong(finite);
    }
    PyBuffer_Release(&points);
    return result;
}

static PyObject *sum_of_squares(PyObject *self, PyObject *args) { return reduction(args, 1); }

static PyObject *all_finite(PyObject *self, PyObject *args) { return reduction(args, 0); }

/* same_bytes(a, b) -> bool: whether two buffers hold the same bytes (TreeCache's exact-reuse test:
 * torch.equal compares elementwise, ~100 us at 100x784 against a few for memcmp). */
static PyObject *same_bytes(PyObject *self, PyObject *args) {
    Py_buffer a, b;
    if (!PyArg_ParseTuple(args, "y*y*", &a, &b)) return NULL;
    int same = a.len == b.len;
    if (same) {
        Py_BEGIN_ALLOW_THREADS
        same = memcmp(a.buf, b.buf, (size_t)a.len) == 0;
        Py_END_ALLOW_THREADS
    }
    PyBuffer_Release(&a);
    PyBuffer_Release(&b);
    return PyBool_FromLong(same);
}

/* metric_slope(bars: double[e], code, slope: double[e] out, or empty) -> value
 * A metric of H0 bars (non-negative, any order) and, when `slope` has room, its gradient with
 * respect to each bar: topoopt.host_metrics in compiled form (codes as METRIC_CODES there: 0
 * entropy, 1 entropy / log count, 2 entropy / log total, 3 mean, 4 total, 5 max). ~100 numbers
 * are a few numpy calls' fixed cost each; here one call. */
static double metric_of(const double *l, Py_ssize_t e, int code, double *out) {
    double value = 0.0;
    if (code <= 2) {  /* entropies: see host_metrics.entropy_parts for the formulas */
        double total = 0.0, entropy = 0.0, scale = 1.0, shift = 0.0;
        Py_ssize_t count = 0;
        for (Py_ssize_t k = 0; k < e; k++) { total += l[k]; count += l[k] > 0.0; }
        if (total > 0.0)
            for (Py_ssize_t k = 0; k < e; k++)
                if (l[k] > 0.0) { double p = l[k] / total; entropy -= p * log(p); }
        if (code == 1) scale = count > 1 ? 1.0 / log((double)count) : 0.0;
        if (code == 2) {
            double denominator = total > 0.0 ? log(total) : 0.0;
            int valid = count > 0 && denominator != 0.0;
            scale = valid ? 1.0 / denominator : 0.0;
            shift = valid ? -entropy / (total * denominator * denominator) : 0.0;
        }
        value = scale * entropy;
        for (Py_ssize_t k = 0; out && k < e; k++)
            out[k] = total > 0.0 ? (l[k] > 0.0 ? scale * -(log(l[k] / total) + entropy) / total + shift
                                               : scale * (1.0 - entropy) / total + shift)
                                 : 0.0;
    } else if (code == 3 || code == 4) {
        for (Py_ssize_t k = 0; k < e; k++) value += l[k];
        if (code == 3 && e) value /= (double)e;
        for (Py_ssize_t k = 0; out && k < e; k++) out[k] = code == 3 ? 1.0 / (double)e : 1.0;
    } else {
        Py_ssize_t ties = 0;
        for (Py_ssize_t k = 0; k < e; k++)  /* a NaN bar makes the maximum NaN, as numpy's and torch's */
            if (k == 0 || l[k] > value || l[k] != l[k]) { value = l[k]; if (value != value) break; }
        for (Py_ssize_t k = 0; k < e; k++) ties += l[k] == value;
        for (Py_ssize_t k = 0; out && k < e; k++) out[k] = l[k] == value ? 1.0 / (double)ties : 0.0;
    }
    return value;
}

static PyObject *metric_slope(PyObject *self, PyObject *args) {
    Py_buffer bars, slope;
    int code;
    if (!PyArg_ParseTuple(args, "y*iw*", &bars, &code, &slope)) return NULL;
    PyObject *result = NULL;
    Py_ssize_t e = bars.len / (Py_ssize_t)sizeof(double);
    if (!expect(code >= 0 && code <= 5 && bars.len % (Py_ssize_t)sizeof(double) == 0 &&
                (slope.len == 0 || slope.len == bars.len),
                "metric_slope: unknown metric code, or bars or slope of the wrong size")) goto done;
    double value;
    Py_BEGIN_ALLOW_THREADS
    value = metric_of(bars.buf, e, code, slope.len ? slope.buf : NULL);
    Py_END_ALLOW_THREADS
    result = PyFloat_FromDouble(value);
done:
    PyBuffer_Release(&bars);
    PyBuffer_Release(&slope);
    return result;
}

/* block_distances(block: float32[r*c] (overwritten), row_norms: float32[r], col_norms: float32[c],
 *                 ratio, result: float32[n*n] out, n, start, near: int32[2*r*c] out) -> near pairs
 * One row block (rows start..start+r, columns start..n) of the general search's Gram pass, in one
 * pass: squared distances |a|²+|b|²−2a·b (float32, clamped at 0, in torch's order of operations:
 * the values of spanning_tree.near_pairs_of_block) written into `result` and its mirror (inside
 * the block's own square the mirror wins, as the torch assignments leave it), and the pairs
 * j > i closer than ratio·(|a|²+|b|²) appended to `near` as (row, column) offsets, row-major. As
 * ~10 torch passes these were short parallel regions that stalled under contention. */
#if defined(__GNUC__) && !defined(__clang__)
__attribute__((optimize("fp-contract=off")))
#endif
static Py_ssize_t block_pass(float *block, const float *rows, const float *cols, float ratio,
                             float *result, Py_ssize_t n, Py_ssize_t start, Py_ssize_t r, Py_ssize_t c,
                             int32_t *near) {
    Py_ssize_t count = 0;
    /* Row by row: the distances (straight into the row of `result`; the block's own square into
     * the block, for the mirror below), and the near pairs. */
    for (Py_ssize_t i = 0; i < r; i++) {
        float *g = block + i * c, *out = result + (start + i) * n + start;
        float a = rows[i];
        for (Py_ssize_t j = 0; j < c; j++) {
            float value = (g[j] * -2.0f + a) + cols[j];
            if (value < 0.0f) value = 0.0f;
            if (j < r) g[j] = value;  /* inside the block's own square only the mirror is kept, */
            else out[j] = value;      /* as the torch assignments leave it */
            if (j > i && value < (a + cols[j]) * ratio) {
                near[2 * count] = (int32_t)i;
                near[2 * count + 1] = (int32_t)j;
                count++;
            }
        }
    }
    /* The mirror, in tiles (a column of `result` a row at a time would touch a page per write):
     * from the block's square, then from the rows of `result` just written. */
    const Py_ssize_t TILE = 32;
    for (Py_ssize_t j0 = 0; j0 < c; j0 += TILE)
        for (Py_ssize_t i0 = 0; i0 < r; i0 += TILE) {
            Py_ssize_t j1 = j0 + TILE < c ? j0 + TILE : c, i1 = i0 + TILE < r ? i0 + TILE : r;
            for (Py_ssize_t j = j0; j < j1; j++) {
                float *out = result + (start + j) * n + start;
                if (j < r)
                    for (Py_ssize_t i = i0; i < i1; i++) out[i] = block[i * c + j];
                else
                    for (Py_ssize_t i = i0; i < i1; i++) out[i] = result[(start + i) * n + start + j];
            }
        }
    return count;
}

static PyObject *block_distances(PyObject *self, PyObject *args) {
    Py_buffer block, rows, cols, result, near;
    double ratio;
    Py_ssize_t n, start;
    if (!PyArg_ParseTuple(args, "w*y*y*dw*nnw*", &block, &rows, &cols, &ratio, &result, &n, &start, &near))
        return NULL;
    PyObject *out = NULL;
    Py_ssize_t r = rows.len / (Py_ssize_t)sizeof(float), c = cols.len / (Py_ssize_t)sizeof(float);
    if (expect(r >= 1 && c >= r && start >= 0 && start + c == n && block.len == r * c * (Py_ssize_t)sizeof(float) &&
               result.len == n * n * (Py_ssize_t)sizeof(float) && near.len == 2 * r * c * (Py_ssize_t)sizeof(int32_t),
               "block_distances: buffer sizes do not match")) {
        Py_ssize_t count;
        Py_BEGIN_ALLOW_THREADS
        count = block_pass(block.buf, rows.buf, cols.buf, (float)ratio, result.buf, n, start, r, c, near.buf);
        Py_END_ALLOW_THREADS
        out = PyLong_FromSsize_t(count);
    }
    PyBuffer_Release(&block);
    PyBuffer_Release(&rows);
    PyBuffer_Release(&cols);
    PyBuffer_Release(&result);
    PyBuffer_Release(&near);
    return out;
}

/* Edge endpoints in range; sets IndexError otherwise. */
static int edges_in_range(const int64_t *u, const int64_t *v, Py_ssize_t e, Py_ssize_t n) {
    for (Py_ssize_t k = 0; k < e; k++) {
        if (u[k] < 0 || u[k] >= n || v[k] < 0 || v[k] >= n) {
            PyErr_Format(PyExc_IndexError, "edge %zd joins points %lld and %lld of a cloud of %zd",
                         k, (long long)u[k], (long long)v[k], n);
            return 0;
        }
    }
    return 1;
}

typedef struct {
    double length;
    Py_ssize_t index;
} keyed_edge;

static int by_length_then_index(const void *a, const void *b) {
    const keyed_edge *x = a, *y = b;
    if (x->length < y->length) return -1;
    if (x->length > y->length) return 1;
    return (x->index > y->index) - (x->index < y->index);
}

/* Each edge's length and its unit direction (a − b)/‖a − b‖ (0 at zero length), both from the
 * difference in double: no under- or overflow for float32 points, and a direction whose entries
 * are at most 1 (a float32 difference of ±3e38 would be infinite). */
#define MEASURE(T)                                                                              \
    VECTORISED static void measure_##T(const T *p, Py_ssize_t d, const int64_t *u, const int64_t *v,         \
                            Py_ssize_t e, T *unit, double *lengths) {                            \
        for (Py_ssize_t k = 0; k < e; k++) {                                                     \
            const T *a = p + u[k] * d, *b = p + v[k] * d;                                        \
            T *row = unit + k * d;                                                               \
            double total = 0.0;                                                                  \
            SIMD_SUM(total)                                                                      \
            for (Py_ssize_t m = 0; m < d; m++) {                                                 \
                double x = (double)a[m] - (double)b[m];                                          \
                total += x * x;                                                                  \
            }                                                                                    \
            double length = sqrt(total), inverse = length > 0.0 ? 1.0 / length : 0.0;            \
            for (Py_ssize_t m = 0; m < d; m++) row[m] = (T)(((double)a[m] - (double)b[m]) * inverse); \
            lengths[k] = length;                                                                 \
        }                                                                                        \
    }
MEASURE(float)
MEASURE(double)

/* `measure`'s lengths alone, and its scatter with each unit direction recomputed from the points
 * as `measure` rounds it (the same values, no e×d buffer written and read back): layer_term. */
#define LENGTHS(T)                                                                              \
    VECTORISED static void lengths_##T(const T *p, Py_ssize_t d, const int64_t *u, const int64_t *v,         \
                            Py_ssize_t e, double *lengths) {                                     \
        for (Py_ssize_t k = 0; k < e; k++) {                                                     \
            const T *a = p + u[k] * d, *b = p + v[k] * d;                                        \
            double total = 0.0;                                                                  \
            SIMD_SUM(total)                                                                      \
            for (Py_ssize_t m = 0; m < d; m++) {                                                 \
                double x = (double)a[m] - (double)b[m];                                          \
                total += x * x;                                                                  \
            }                                                                                    \
            lengths[k] = sqrt(total);                                                            \
        }                                                                                        \
    }                                                                                            \
    VECTORISED static void scatter_from_points_##T(const T *p, Py_ssize_t d, const int64_t *u,              \
                            const int64_t *v, Py_ssize_t e, const double *lengths, const T *grad, T *out) { \
        for (Py_ssize_t k = 0; k < e; k++) {                                                     \
            if (!(lengths[k] > 0.0)) continue;                                                   \
            const T *a = p + u[k] * d, *b = p + v[k] * d;                                        \
            double inverse = 1.0 / lengths[k];                                                   \
            T coefficient = grad[k];                                                             \
            T *to_a = out + u[k] * d, *to_b = out + v[k] * d;                                    \
            for (Py_ssize_t m = 0; m < d; m++) {                                                 \
                T step = (T)(((double)a[m] - (double)b[m]) * inverse) * coefficient;             \
                to_a[m] += step;                                                                 \
                to_b[m] -= step;                                                                 \
            }                                                                                    \
        }                                                                                        \
    }
LENGTHS(float)
LENGTHS(double)

/* A non-negative double rounded to the nearest float, as numpy's and torch's casts round it:
 * above FLT_MAX but below FLT_MAX + half its last unit it is FLT_MAX; from there (a tie, which
 * rounds to even) it is infinite. The C conversion is undefined outside float's range. */
static float to_float(double x) {
    if (x >= 3.4028235677973366e38) return INFINITY;
    return x > FLT_MAX ? FLT_MAX : (float)x;
}

/* measure(points: T[n*d], itemsize, n, d, u, v: int64[e], unit: T[e*d] out, lengths: double[e]
 *         out, order: int64[e] or empty out, sorted: T[e] or empty out)
 * Unit directions and lengths in the edges' order; with non-empty order/sorted, also the ascending
 * order of the lengths (ties by position, as a stable sort) and the lengths in that order, rounded
 * to the points' type (rounded to nearest as a cast rounds them: `to_float`). */
static PyObject *measure(PyObject *self, PyObject *args) {
    Py_buffer points, u, v, unit, lengths, order, sorted;
    Py_ssize_t itemsize, n, d;
    if (!PyArg_ParseTuple(args, "y*nnny*y*w*w*w*w*", &points, &itemsize, &n, &d, &u, &v, &unit, &lengths,
                          &order, &sorted)) return NULL;
    PyObject *result = NULL;
    Py_ssize_t e = u.len / (Py_ssize_t)sizeof(int64_t);
    int sort = order.len > 0;
    keyed_edge *keyed = NULL;
    if (!expect((itemsize == 4 || itemsize == 8) && d >= 1 && points.len == n * d * itemsize &&
                v.len == u.len && lengths.len == e * (Py_ssize_t)sizeof(double) &&
                unit.len == e * d * itemsize && (order.len == 0 || order.len == u.len) &&
                sorted.len == (sort ? e * itemsize : 0), "measure: buffer sizes do not match") ||
        !edges_in_range((const int64_t *)u.buf, (const int64_t *)v.buf, e, n)) goto done;
    if (sort && !(keyed = malloc((size_t)(e ? e : 1) * sizeof(keyed_edge)))) { PyErr_NoMemory(); goto done; }
    double *raw = lengths.buf;
    Py_BEGIN_ALLOW_THREADS
    if (itemsize == 4) measure_float(points.buf, d, u.buf, v.buf, e, unit.buf, raw);
    else measure_double(points.buf, d, u.buf, v.buf, e, unit.buf, raw);
    if (sort) {
        for (Py_ssize_t k = 0; k < e; k++) { keyed[k].length = raw[k]; keyed[k].index = k; }
        qsort(keyed, (size_t)e, sizeof(keyed_edge), by_length_then_index);
        for (Py_ssize_t k = 0; k < e; k++) {
            ((int64_t *)order.buf)[k] = keyed[k].index;
            double length = keyed[k].length;
            if (itemsize == 8) ((double *)sorted.buf)[k] = length;
            else ((float *)sorted.buf)[k] = to_float(length);
        }
    }
    Py_END_ALLOW_THREADS
    result = Py_None;
    Py_INCREF(result);
done:
    free(keyed);
    PyBuffer_Release(&points);
    PyBuffer_Release(&u);
    PyBuffer_Release(&v);
    PyBuffer_Release(&unit);
    PyBuffer_Release(&lengths);
    PyBuffer_Release(&order);
    PyBuffer_Release(&sorted);
    return result;
}

/* The gradient of the lengths: grad[j] belongs to edge order[j] (edge j without an order):
 * out[u] += grad · unit, out[v] -= the same; 0 at zero length (where unit is 0). */
#define SCATTER(T)                                                                              \
    VECTORISED static void scatter_##T(const T *unit, Py_ssize_t d, const int64_t *u, const int64_t *v,      \
                            Py_ssize_t e, const double *lengths, const T *grad,                  \
                            const int64_t *order, T *out) {                                      \
        for (Py_ssize_t j = 0; j < e; j++) {                                                     \
            Py_ssize_t k = order ? order[j] : j;                                                 \
            if (!(lengths[k] > 0.0)) continue;                                                   \
            T coefficient = grad[j];                                                             \
            const T *row = unit + k * d;                                                         \
            T *a = out + u[k] * d, *b = out + v[k] * d;                                          \
            for (Py_ssize_t m = 0; m < d; m++) {                                                 \
                T step = row[m] * coefficient;                                                   \
                a[m] += step;                                                                    \
                b[m] -= step;                                                                    \
            }                                                                                    \
        }                                                                                        \
    }
SCATTER(float)
SCATTER(double)

/* scatter(unit: T[e*d], itemsize, d, u, v: int64[e], lengths: double[e], grad: T[e],
 *         order: int64[e] or empty, out: T[n*d] out, n): the gradient, into `out` (zeroed
 *         here: a torch.zeros of a big cloud is a parallel region, which stalls under load) */
static PyObject *scatter(PyObject *self, PyObject *args) {
    Py_buffer unit, u, v, lengths, grad, order, out;
    Py_ssize_t itemsize, d, n;
    if (!PyArg_ParseTuple(args, "y*nny*y*y*y*y*w*n", &unit, &itemsize, &d, &u, &v, &lengths, &grad,
                          &order, &out, &n)) return NULL;
    PyObject *result = NULL;
    Py_ssize_t e = u.len / (Py_ssize_t)sizeof(int64_t);
    if (!expect((itemsize == 4 || itemsize == 8) && d >= 1 && unit.len == e * d * itemsize &&
                v.len == u.len && lengths.len == e * (Py_ssize_t)sizeof(double) &&
                grad.len == e * itemsize && (order.len == 0 || order.len == u.len) &&
                out.len == n * d * itemsize, "scatter: buffer sizes do not match") ||
        !edges_in_range((const int64_t *)u.buf, (const int64_t *)v.buf, e, n)) goto done;
    const int64_t *at = order.len ? (const int64_t *)order.buf : NULL;
    if (at) {
        for (Py_ssize_t j = 0; j < e; j++)
            if (at[j] < 0 || at[j] >= e) { PyErr_SetString(PyExc_IndexError, "scatter: order out of range"); goto done; }
    }
    Py_BEGIN_ALLOW_THREADS
    memset(out.buf, 0, (size_t)out.len);
    if (itemsize == 4) scatter_float(unit.buf, d, u.buf, v.buf, e, lengths.buf, grad.buf, at, out.buf);
    else scatter_double(unit.buf, d, u.buf, v.buf, e, lengths.buf, grad.buf, at, out.buf);
    Py_END_ALLOW_THREADS
    result = Py_None;
    Py_INCREF(result);
done:
    PyBuffer_Release(&unit);
    PyBuffer_Release(&u);
    PyBuffer_Release(&v);
    PyBuffer_Release(&lengths);
    PyBuffer_Release(&grad);
    PyBuffer_Release(&order);
    PyBuffer_Release(&out);
    return result;
}

/* A double rounded to the nearest float as a cast rounds it (`to_float`), either sign. */
static float to_float_signed(double x) {
    float magnitude = to_float(fabs(x));
    return x < 0.0 ? -magnitude : magnitude;
}

/* layer_term(points: T[n*d], itemsize, n, d, u, v: int64[e], code, coefficient, sign, target,
 *            deaths: T[e] out, gradient: T[n*d] or empty out) -> (metric, term, longest)
 * One layer of topoopt.penalty_node in one call: the edges' lengths rounded to the points' type
 * (`deaths`, in edge order, rounded as a cast rounds them: `to_float`) and their metric, rounded to
 * it too (as the per-layer graph's is); the layer's term, coefficient·sign·
 * metric, or coefficient·(metric − target)² when target is not NaN; the longest death (NaN if
 * one is), for the caller's range check; and, when `gradient` has room and the metric is finite,
 * the term's gradient with respect to the points: the metric's slope times the term's derivative,
 * cast to the points' type, scattered as `measure` and `scatter` would (zeroed first). One call a layer where
 * the fixed cost of ~10 small numpy and torch operations was most of the time. */
/* Scratch of term_into for up to `edges` edges of `itemsize`-byte points; NULL when out of memory. */
typedef struct { double *lengths, *rounded, *slope; void *grad; } term_scratch;

static int term_scratch_alloc(term_scratch *s, Py_ssize_t edges, Py_ssize_t itemsize) {
    size_t count = (size_t)(edges > 0 ? edges : 1);
    s->lengths = malloc(count * sizeof(double));
    s->rounded = malloc(count * sizeof(double));
    s->slope = malloc(count * sizeof(double));
    s->grad = malloc(count * (size_t)itemsize);
    return s->lengths && s->rounded && s->slope && s->grad;
}

static void term_scratch_free(term_scratch *s) {
    free(s->lengths); free(s->rounded); free(s->slope); free(s->grad);
}

/* layer_term's work, no Python calls (the GIL may be released); gradient NULL: none asked for.
 * out: metric, term, longest. */
static void term_into(const void *points, Py_ssize_t itemsize, Py_ssize_t n, Py_ssize_t d, const int64_t *u,
                      const int64_t *v, Py_ssize_t e, int code, double coefficient, double sign, double target,
                      void *deaths, void *gradient, term_scratch *s, double out[3]) {
    double *lengths = s->lengths, *rounded = s->rounded, *slope = s->slope;
    double metric, term, derivative, longest = 0.0;
    if (itemsize == 4) {
        lengths_float(points, d, u, v, e, lengths);
        for (Py_ssize_t k = 0; k < e; k++) {
            float length = to_float(lengths[k]);
            ((float *)deaths)[k] = length;
            rounded[k] = length;
        }
    } else {
        lengths_double(points, d, u, v, e, lengths);
        memcpy(deaths, lengths, (size_t)e * sizeof(double));
        memcpy(rounded, lengths, (size_t)e * sizeof(double));
    }
    for (Py_ssize_t k = 0; k < e; k++)
        if (k == 0 || rounded[k] > longest || rounded[k] != rounded[k]) { longest = rounded[k]; if (longest != longest) break; }
    metric = metric_of(rounded, e, code, gradient ? slope : NULL);
    if (itemsize == 4) metric = to_float_signed(metric);
    if (target == target) {  /* the term and its derivative (LayerTerm.of_tensor's) */
        double gap = metric - target;
        term = coefficient * gap * gap;
        derivative = coefficient * 2.0 * gap;
    } else {
        term = coefficient * sign * metric;
        derivative = coefficient * sign;
    }
    if (gradient && isfinite(metric)) {
        memset(gradient, 0, (size_t)(n * d * itemsize));
        if (itemsize == 4) {
            for (Py_ssize_t k = 0; k < e; k++) ((float *)s->grad)[k] = to_float_signed(slope[k] * derivative);
            scatter_from_points_float(points, d, u, v, e, lengths, s->grad, gradient);
        } else {
            for (Py_ssize_t k = 0; k < e; k++) ((double *)s->grad)[k] = slope[k] * derivative;
            scatter_from_points_double(points, d, u, v, e, lengths, s->grad, gradient);
        }
    }
    out[0] = metric; out[1] = term; out[2] = longest;
}

static PyObject *layer_term(PyObject *self, PyObject *args) {
    Py_buffer points, u, v, deaths, gradient;
    Py_ssize_t itemsize, n, d;
    int code;
    double coefficient, sign, target;
    if (!PyArg_ParseTuple(args, "y*nnny*y*idddw*w*", &points, &itemsize, &n, &d, &u, &v, &code, &coefficient,
                          &sign, &target, &deaths, &gradient)) return NULL;
    PyObject *result = NULL;
    Py_ssize_t e = u.len / (Py_ssize_t)sizeof(int64_t);
    int wants_gradient = gradient.len > 0;
    term_scratch s = {NULL, NULL, NULL, NULL};
    if (!expect((itemsize == 4 || itemsize == 8) && d >= 1 && points.len == n * d * itemsize &&
                v.len == u.len && deaths.len == e * itemsize &&
                (!wants_gradient || gradient.len == n * d * itemsize) && code >= 0 && code <= 5,
                "layer_term: buffer sizes do not match, or an unknown metric code") ||
        !edges_in_range((const int64_t *)u.buf, (const int64_t *)v.buf, e, n)) goto done;
    if (!term_scratch_alloc(&s, e, itemsize)) { PyErr_NoMemory(); goto done; }
    double out[3];
    Py_BEGIN_ALLOW_THREADS
    term_into(points.buf, itemsize, n, d, u.buf, v.buf, e, code, coefficient, sign, target, deaths.buf,
              wants_gradient ? gradient.buf : NULL, &s, out);
    Py_END_ALLOW_THREADS
    result = Py_BuildValue("ddd", out[0], out[1], out[2]);
done:
    term_scratch_free(&s);
    PyBuffer_Release(&points);
    PyBuffer_Release(&u);
    PyBuffer_Release(&v);
    PyBuffer_Release(&deaths);
    PyBuffer_Release(&gradient);
    return result;
}

/* One layer of exact_terms: its buffers (views[0..7]: points, kept, u_old, v_old, u_new, v_new,
 * deaths, gradient), sizes, coefficient and outcome. */
typedef struct {
    Py_buffer views[8];
    int held;
    Py_ssize_t n, d;
    double coefficient;
    int status;
    double out[3];
} exact_layer;

enum { POINTS, KEPT, U_OLD, V_OLD, U_NEW, V_NEW, DEATHS, GRADIENT };

/* exact_terms(layers: [(points: float32[n*d], n, d, kept: float32[n*d] out or empty, u_old, v_old:
 *                       int64[n-1] or empty, u_new, v_new: int64[n-1] out or empty, deaths: float32[n-1]
 *                       out, gradient: float32[n*d] out or empty, coefficient)],
 *             code, sign, target, ratio, pairs_per_point) -> [(status, metric, term, longest)], or the index
 *             of the first layer whose points are not all finite (then nothing is written)
 * A training step's exact tree lookups (TreeCache) and penalty terms (layer_term) of float32
 * clouds in one call; in a Python loop of ~10 calls a layer their fixed costs were most of the
 * step's overhead. Per layer, status:
 *   0  points hold kept's bytes: measured along the kept tree (u_old, v_old);
 *   1  searched (small_tree, max_pairs pairs_per_point·n) into u_new, v_new, then points copied into
 *      kept (when it has room);
 *   2  u_new empty: the tree given as u_old, v_old (found elsewhere), points copied into kept;
 *  -1  the search declined (as small_tree's -1): nothing written for this layer, no term.
 * Finiteness is checked for every layer first, so a NaN layer leaves everything as it was. */
static PyObject *exact_terms(PyObject *self, PyObject *args) {
    PyObject *list;
    int code;
    double sign, target, ratio;
    Py_ssize_t pairs_per_point;
    if (!PyArg_ParseTuple(args, "Oidddn", &list, &code, &sign, &target, &ratio, &pairs_per_point)) return NULL;
    PyObject *items = PySequence_Fast(list, "exact_terms: expected a list of layers");
    if (!items) return NULL;
    Py_ssize_t count = PySequence_Fast_GET_SIZE(items), parsed = 0, largest_n = 2, largest_e = 1;
    PyObject *result = NULL;
    exact_layer *layers = PyMem_Calloc((size_t)(count ? count : 1), sizeof(exact_layer));
    term_scratch s = {NULL, NULL, NULL, NULL};
    float *g = NULL, *key = NULL;
    double *norms = NULL;
    int64_t *parent = NULL, *frontier = NULL;
    if (!layers) { PyErr_NoMemory(); goto done; }
    for (; parsed < count; parsed++) {
        exact_layer *l = &layers[parsed];
        Py_buffer *b = l->views;
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(items, parsed), "y*nnw*y*y*w*w*w*w*d", &b[POINTS], &l->n,
                              &l->d, &b[KEPT], &b[U_OLD], &b[V_OLD], &b[U_NEW], &b[V_NEW], &b[DEATHS],
                              &b[GRADIENT], &l->coefficient)) goto done;
        l->held = 1;
        Py_ssize_t n = l->n, d = l->d, cloud = n * d * (Py_ssize_t)sizeof(float);
        Py_ssize_t tree = (n - 1) * (Py_ssize_t)sizeof(int64_t);
        int given = b[U_NEW].len == 0;
        if (!expect(n >= 2 && d >= 1 && b[POINTS].len == cloud && (b[KEPT].len == 0 || b[KEPT].len == cloud) &&
                    (b[U_OLD].len == 0 || b[U_OLD].len == tree) && b[V_OLD].len == b[U_OLD].len &&
                    (given || b[U_NEW].len == tree) && b[V_NEW].len == b[U_NEW].len &&
                    !(given && b[U_OLD].len == 0) && b[DEATHS].len == (n - 1) * (Py_ssize_t)sizeof(float) &&
                    (b[GRADIENT].len == 0 || b[GRADIENT].len == cloud) && code >= 0 && code <= 5,
                    "exact_terms: buffer sizes do not match, or an unknown metric code")) goto done;
        if (b[U_OLD].len && !edges_in_range(b[U_OLD].buf, b[V_OLD].buf, n - 1, n)) goto done;
        if (n > largest_n) largest_n = n;
    }
    largest_e = largest_n - 1;
    g = malloc((size_t)(largest_n * largest_n) * sizeof(float));
    norms = malloc((size_t)largest_n * sizeof(double));
    key = malloc((size_t)largest_n * sizeof(float));
    parent = malloc((size_t)largest_n * sizeof(int64_t));
    frontier = malloc((size_t)largest_n * sizeof(int64_t));
    if (!g || !norms || !key || !parent || !frontier || !term_scratch_alloc(&s, largest_e, sizeof(float))) {
        PyErr_NoMemory();
        goto done;
    }
    Py_ssize_t not_finite = -1;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < count && not_finite < 0; i++)
        if (!all_finite_float(layers[i].views[POINTS].buf, layers[i].n * layers[i].d)) not_finite = i;
    for (Py_ssize_t i = 0; i < count && not_finite < 0; i++) {
        exact_layer *l = &layers[i];
        Py_buffer *b = l->views;
        if (b[U_NEW].len == 0) {
            l->status = 2;
        } else if (b[KEPT].len && b[U_OLD].len && memcmp(b[POINTS].buf, b[KEPT].buf, (size_t)b[POINTS].len) == 0) {
            l->status = 0;
        } else {
            Py_ssize_t near = small_tree_into(b[POINTS].buf, l->n, l->d, ratio, pairs_per_point * l->n, g, norms, key, parent,
                                              frontier, b[U_NEW].buf, b[V_NEW].buf);
            l->status = near < 0 ? -1 : 1;
        }
        if (l->status < 0) continue;
        if (l->status > 0 && b[KEPT].len) memcpy(b[KEPT].buf, b[POINTS].buf, (size_t)b[POINTS].len);
        int searched = l->status == 1;
        term_into(b[POINTS].buf, sizeof(float), l->n, l->d, b[searched ? U_NEW : U_OLD].buf,
                  b[searched ? V_NEW : V_OLD].buf, l->n - 1, code, l->coefficient, sign, target, b[DEATHS].buf,
                  b[GRADIENT].len ? b[GRADIENT].buf : NULL, &s, l->out);
    }
    Py_END_ALLOW_THREADS
    if (not_finite >= 0) {
        result = PyLong_FromSsize_t(not_finite);
        goto done;
    }
    result = PyList_New(count);
    for (Py_ssize_t i = 0; result && i < count; i++) {
        exact_layer *l = &layers[i];
        PyObject *item = Py_BuildValue("iddd", l->status, l->out[0], l->out[1], l->out[2]);
        if (!item) { Py_CLEAR(result); break; }
        PyList_SET_ITEM(result, i, item);
    }
done:
    for (Py_ssize_t i = 0; layers && i < count; i++)
        if (layers[i].held)
            for (int k = 0; k < 8; k++) PyBuffer_Release(&layers[i].views[k]);
    PyMem_Free(layers);
    term_scratch_free(&s);
    free(g); free(norms); free(key); free(parent); free(frontier);
    Py_DECREF(items);
    return result;
}

/* A list of C-contiguous float32/float64 buffers (writable ones if asked) into a new array
 * (*views, PyMem_Free it); count, or -1 with an exception set and nothing left to release. */
static Py_ssize_t get_buffers(PyObject *list, Py_buffer **out, int writable) {
    *out = NULL;
    PyObject *items = PySequence_Fast(list, "expected a list of buffers");
    if (!items) return -1;
    Py_ssize_t count = PySequence_Fast_GET_SIZE(items);
    Py_buffer *views = *out = PyMem_Calloc((size_t)(count ? count : 1), sizeof(Py_buffer));
    if (!views) {
        PyErr_NoMemory();
        Py_DECREF(items);
        return -1;
    }
    int flags = PyBUF_FORMAT | PyBUF_C_CONTIGUOUS | (writable ? PyBUF_WRITABLE : 0);
    for (Py_ssize_t i = 0; i < count; i++) {
        if (PyObject_GetBuffer(PySequence_Fast_GET_ITEM(items, i), &views[i], flags) < 0 ||
            !(views[i].format && (strcmp(views[i].format, "f") == 0 || strcmp(views[i].format, "d") == 0))) {
            if (!PyErr_Occurred()) {
                PyErr_SetString(PyExc_ValueError, "expected float32 or float64 buffers");
                PyBuffer_Release(&views[i]);
            }
            for (Py_ssize_t j = 0; j < i; j++) PyBuffer_Release(&views[j]);
            PyMem_Free(views);
            *out = NULL;
            Py_DECREF(items);
            return -1;
        }
    }
    Py_DECREF(items);
    return count;
}

/* p = p + w·(old − p) elementwise, as torch.lerp(p, old, w) computes it (w < 0.5: p + w·(old − p);
 * otherwise old − (old − p)·(1 − w)), so that results equal torch._foreach_lerp_'s. */
#define LERP(T)                                                                                 \
    VECTORISED static void lerp_##T(T *p, const T *old, Py_ssize_t count, double weight) {       \
        T w = (T)weight;                                                                         \
        if (fabs((double)w) < 0.5) {                                                             \
            for (Py_ssize_t k = 0; k < count; k++) p[k] = p[k] + w * (old[k] - p[k]);            \
        } else {                                                                                 \
            T rest = (T)1 - w;                                                                   \
            for (Py_ssize_t k = 0; k < count; k++) p[k] = old[k] - (old[k] - p[k]) * rest;       \
        }                                                                                        \
    }
LERP(float)
LERP(double)

/* scale_steps(params: [writable], before: [buffers], weights: [float], check: bool) -> [int]
 * TopoOptimizer's scaling of a step: the indices of the params holding a NaN or Inf when
 * `check` (then nothing is written), else each param moved back towards its value before the
 * step: lerp(p, before, weight). One call for all the wrapped tensors. */
static PyObject *scale_steps(PyObject *self, PyObject *args) {
    PyObject *param_list, *before_list, *weight_list;
    int check;
    if (!PyArg_ParseTuple(args, "OOOp", &param_list, &before_list, &weight_list, &check)) return NULL;
    Py_buffer *params = NULL, *before = NULL;
    PyObject *result = NULL;
    double *weights = NULL;
    Py_ssize_t count = get_buffers(param_list, &params, 1), count_before = -1;
    if (count < 0) goto done;
    count_before = get_buffers(before_list, &before, 0);
    if (count_before < 0) goto done;
    PyObject *items = PySequence_Fast(weight_list, "expected a list of weights");
    if (!items) goto done;
    weights = PyMem_Malloc((size_t)(count ? count : 1) * sizeof(double));
    if (!weights) { PyErr_NoMemory(); Py_DECREF(items); goto done; }
    int ok = count_before == count && PySequence_Fast_GET_SIZE(items) == count;
    for (Py_ssize_t i = 0; ok && i < count; i++) {
        weights[i] = PyFloat_AsDouble(PySequence_Fast_GET_ITEM(items, i));
        ok = !(weights[i] == -1.0 && PyErr_Occurred()) && params[i].len == before[i].len &&
             strcmp(params[i].format, before[i].format) == 0;
    }
    Py_DECREF(items);
    if (!ok) {
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "scale_steps: mismatched buffers or weights");
        goto done;
    }
    result = PyList_New(0);
    if (!result) goto done;
    if (check) {
        for (Py_ssize_t i = 0; i < count; i++) {
            int finite = params[i].format[0] == 'f' ? all_finite_float(params[i].buf, params[i].len / 4)
                                                    : all_finite_double(params[i].buf, params[i].len / 8);
            if (!finite) {
                PyObject *index = PyLong_FromSsize_t(i);
                if (!index || PyList_Append(result, index) < 0) { Py_XDECREF(index); Py_CLEAR(result); goto done; }
                Py_DECREF(index);
            }
        }
    }
    if (PyList_GET_SIZE(result) == 0) {
        Py_BEGIN_ALLOW_THREADS
        for (Py_ssize_t i = 0; i < count; i++) {
            if (params[i].format[0] == 'f') lerp_float(params[i].buf, before[i].buf, params[i].len / 4, weights[i]);
            else lerp_double(params[i].buf, before[i].buf, params[i].len / 8, weights[i]);
        }
        Py_END_ALLOW_THREADS
    }
done:
    for (Py_ssize_t i = 0; i < count_before; i++) PyBuffer_Release(&before[i]);
    for (Py_ssize_t i = 0; i < count; i++) PyBuffer_Release(&params[i]);
    PyMem_Free(weights);
    PyMem_Free(before);
    PyMem_Free(params);
    return result;
}

/* copy_all(sources: [buffers], targets: [writable]): each target = its source. */
static PyObject *copy_all(PyObject *self, PyObject *args) {
    PyObject *source_list, *target_list;
    if (!PyArg_ParseTuple(args, "OO", &source_list, &target_list)) return NULL;
    Py_buffer *sources = NULL, *targets = NULL;
    PyObject *result = NULL;
    Py_ssize_t count = get_buffers(source_list, &sources, 0), count_targets = -1;
    if (count < 0) goto done;
    count_targets = get_buffers(target_list, &targets, 1);
    if (count_targets < 0) goto done;
    int ok = count_targets == count;
    for (Py_ssize_t i = 0; ok && i < count; i++)
        ok = sources[i].len == targets[i].len && strcmp(sources[i].format, targets[i].format) == 0;
    if (!ok) {
        PyErr_SetString(PyExc_ValueError, "copy_all: mismatched buffers");
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < count; i++) memcpy(targets[i].buf, sources[i].buf, (size_t)sources[i].len);
    Py_END_ALLOW_THREADS
    result = Py_None;
    Py_INCREF(result);
done:
    for (Py_ssize_t i = 0; i < count; i++) PyBuffer_Release(&sources[i]);
    for (Py_ssize_t i = 0; i < count_targets; i++) PyBuffer_Release(&targets[i]);
    PyMem_Free(sources);
    PyMem_Free(targets);
    return result;
}

static PyMethodDef methods[] = {
    {"prim", prim, METH_VARARGS, "Minimum spanning tree edges of a dense float32 matrix (Prim)."},
    {"small_tree", small_tree, METH_VARARGS, "A small cloud's tree from its Gram product."},
    {"all_finite", all_finite, METH_VARARGS, "Whether a float buffer holds no NaN or infinity."},
    {"sum_of_squares", sum_of_squares, METH_VARARGS, "Sum of squares of a float buffer, in double."},
    {"scale_steps", scale_steps, METH_VARARGS, "TopoOptimizer's step scaling: check, then lerp back."},
    {"copy_all", copy_all, METH_VARARGS, "Copy each buffer of a list into its target."},
    {"metric_slope", metric_slope, METH_VARARGS, "A metric of H0 bars and its slope."},
    {"block_distances", block_distances, METH_VARARGS, "A row block of the general search's distances."},
    {"same_bytes", same_bytes, METH_VARARGS, "Whether two buffers hold the same bytes."},
    {"measure", measure, METH_VARARGS, "Edge lengths and differences, optionally sorted."},
    {"scatter", scatter, METH_VARARGS, "Gradient of edge lengths, scattered to the points."},
    {"layer_term", layer_term, METH_VARARGS, "One layer of the one-node penalty: deaths, metric, term, gradient."},
    {"exact_terms", exact_terms, METH_VARARGS, "A training step's exact tree lookups and penalty terms, in one call."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_engine", NULL, -1, methods};

PyMODINIT_FUNC PyInit__engine(void) { return PyModule_Create(&module); }
