/* nodeagent._native: per-page digests for the hash tracker, one call per buffer.
 *
 * Why C: the hash tracker digests every present page at every capture; a Python call per
 * page costs more than reading the page. This computes 128-bit digests of N pages in one
 * call, without the GIL. The hash is two wyhash-style 64-bit lanes (128-bit multiply-mix)
 * with different seeds: not cryptographic, built for change detection of a process's own
 * writes (collision odds ~2^-128 per changed page for non-adversarial data).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

static inline uint64_t mum(uint64_t a, uint64_t b) {
    __uint128_t r = (__uint128_t)a * b;
    return (uint64_t)r ^ (uint64_t)(r >> 64);
}

static inline uint64_t rd64(const unsigned char *p) {
    uint64_t v;
    memcpy(&v, p, 8);
    return v;
}

static const uint64_t P0 = 0xa0761d6478bd642full, P1 = 0xe7037ed1a0b428dbull,
                      P2 = 0x8ebc6af09c88c6e3ull, P3 = 0x589965cc75374cc3ull;

/* len must be a multiple of 32 (pages are). */
static uint64_t lane(const unsigned char *p, size_t len, uint64_t seed) {
    uint64_t a = seed ^ P0, b = seed ^ P1;
    for (size_t i = 0; i < len; i += 32) {
        a = mum(rd64(p + i) ^ P1 ^ a, rd64(p + i + 8) ^ P2);
        b = mum(rd64(p + i + 16) ^ P3 ^ b, rd64(p + i + 24) ^ P0);
    }
    return mum(a ^ P2 ^ (uint64_t)len, b ^ P3);
}

static PyObject *page_digests(PyObject *self, PyObject *args) {
    Py_buffer src, out;
    Py_ssize_t page_size;
    unsigned long long seed;
    if (!PyArg_ParseTuple(args, "y*nKw*", &src, &page_size, &seed, &out))
        return NULL;
    PyObject *ret = NULL;
    if (page_size <= 0 || page_size % 32 != 0 || src.len % page_size != 0) {
        PyErr_SetString(PyExc_ValueError, "buffer must be whole pages of a size divisible by 32");
        goto done;
    }
    Py_ssize_t n = src.len / page_size;
    if (out.len < n * 16) {
        PyErr_SetString(PyExc_ValueError, "output buffer too small: need 16 bytes per page");
        goto done;
    }
    const unsigned char *s = src.buf;
    unsigned char *o = out.buf;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < n; i++) {
        uint64_t h0 = lane(s + i * page_size, (size_t)page_size, seed);
        uint64_t h1 = lane(s + i * page_size, (size_t)page_size, seed ^ 0x9e3779b97f4a7c15ull);
        memcpy(o + i * 16, &h0, 8);
        memcpy(o + i * 16 + 8, &h1, 8);
    }
    Py_END_ALLOW_THREADS
    ret = PyLong_FromSsize_t(n);
done:
    PyBuffer_Release(&src);
    PyBuffer_Release(&out);
    return ret;
}

static PyMethodDef methods[] = {
    {"page_digests", page_digests, METH_VARARGS,
     "page_digests(src, page_size, seed, out) -> n: write a 16-byte digest per page into out"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "nodeagent._native",
                                    "Native helpers of the node agent.", -1, methods};

PyMODINIT_FUNC PyInit__native(void) { return PyModule_Create(&module); }
