/* Prim's algorithm on a dense float32 matrix of squared distances: the N-1 edges of a minimum
 * spanning tree. Compiled because the same loop in numpy costs ~5 us an iteration in call
 * overhead (benchmarks/h0.py measures both); the arithmetic is O(N^2) either way.
 * Python signature: prim(matrix: buffer float32 N*N, n: int, u: writable int64[N-1], v: ...). */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

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

static PyObject *prim(PyObject *self, PyObject *args) {
    Py_buffer matrix, u, v;
    Py_ssize_t n;
    if (!PyArg_ParseTuple(args, "y*nw*w*", &matrix, &n, &u, &v)) return NULL;
    PyObject *result = NULL;
    if (n < 2 || matrix.len != (Py_ssize_t)(n * n * sizeof(float)) ||
        u.len != (Py_ssize_t)((n - 1) * sizeof(int64_t)) || v.len != u.len) {
        PyErr_SetString(PyExc_ValueError, "prim: expected an n*n float32 matrix and two int64[n-1] outputs");
        goto done;
    }
    float *key = malloc((size_t)(n - 1) * sizeof(float));
    int64_t *parent = malloc((size_t)(n - 1) * sizeof(int64_t));
    int64_t *frontier = malloc((size_t)(n - 1) * sizeof(int64_t));
    if (!key || !parent || !frontier) {
        PyErr_NoMemory();
    } else {
        Py_BEGIN_ALLOW_THREADS
        prim_edges((const float *)matrix.buf, n, (int64_t *)u.buf, (int64_t *)v.buf, key, parent, frontier);
        Py_END_ALLOW_THREADS
        result = Py_None;
        Py_INCREF(result);
    }
    free(key); free(parent); free(frontier);
done:
    PyBuffer_Release(&matrix);
    PyBuffer_Release(&u);
    PyBuffer_Release(&v);
    return result;
}

static PyMethodDef methods[] = {
    {"prim", prim, METH_VARARGS, "Minimum spanning tree edges of a dense float32 matrix (Prim)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_prim", NULL, -1, methods};

PyMODINIT_FUNC PyInit__prim(void) { return PyModule_Create(&module); }
