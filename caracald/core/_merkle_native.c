/* The verifier's hot loop in C: RFC 9162 leaf hashes of entries packed back to back, and tree roots over
 * packed leaf hashes. caracald/core/merkle.py holds the reference implementation of both (used when this
 * module is not built) and the tests check that the two agree.
 *
 * SHA-256 comes from OpenSSL's libcrypto, whose low-level interface uses the CPU's SHA instructions when it
 * has them. Hashing runs without the GIL: the input buffers are held by the caller for the call's duration
 * and the output object is not visible to anyone else yet.
 */
#define PY_SSIZE_T_CLEAN
#define OPENSSL_SUPPRESS_DEPRECATED /* SHA256_Init & co.: deprecated in OpenSSL 3, still the fastest path */
#include <Python.h>
#include <openssl/sha.h>
#include <stdint.h>
#include <string.h>

#define HASH_SIZE SHA256_DIGEST_LENGTH

static const unsigned char LEAF_PREFIX = 0x00;
static const unsigned char NODE_PREFIX = 0x01;

static int32_t read_be32(const unsigned char *p) {
    return (int32_t)(((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | (uint32_t)p[3]);
}

/* The hashes of `n` entries whose big-endian int32 lengths are `lengths` and whose bytes follow each other in
 * `data`; returns 0, or -1 when the lengths do not add up to the data. `ascending` is cleared unless every
 * entry holds the key slice [key_start, key_end) and the keys strictly increase (compared as bytes). */
static int hash_entries(const unsigned char *lengths, Py_ssize_t n, const unsigned char *data, Py_ssize_t size,
                        Py_ssize_t key_start, Py_ssize_t key_end, unsigned char *out, int *ascending) {
    SHA256_CTX prefixed, ctx;
    SHA256_Init(&prefixed);
    SHA256_Update(&prefixed, &LEAF_PREFIX, 1);
    const Py_ssize_t key_size = key_end - key_start;
    const unsigned char *previous_key = NULL;
    Py_ssize_t pos = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        int32_t length = read_be32(lengths + 4 * i);
        if (length < 0 || (Py_ssize_t)length > size - pos) {
            return -1;
        }
        const unsigned char *entry = data + pos;
        ctx = prefixed;
        SHA256_Update(&ctx, entry, (size_t)length);
        SHA256_Final(out + HASH_SIZE * i, &ctx);
        if (*ascending) {
            if ((Py_ssize_t)length < key_end) {
                *ascending = 0;
            } else {
                const unsigned char *key = entry + key_start;
                if (previous_key != NULL && memcmp(previous_key, key, (size_t)key_size) >= 0) {
                    *ascending = 0;
                }
                previous_key = key;
            }
        }
        pos += length;
    }
    return pos == size ? 0 : -1;
}

static PyObject *packed_leaf_hashes(PyObject *module, PyObject *args) {
    Py_buffer lengths, data;
    Py_ssize_t key_start, key_end;
    if (!PyArg_ParseTuple(args, "y*y*nn:packed_leaf_hashes", &lengths, &data, &key_start, &key_end)) {
        return NULL;
    }
    PyObject *result = NULL;
    if (key_start < 0 || key_end < key_start) {
        PyErr_SetString(PyExc_ValueError, "the key slice must be [start, end) with 0 <= start <= end");
        goto done;
    }
    if (lengths.len % 4 != 0) {
        result = Py_NewRef(Py_None);
        goto done;
    }
    Py_ssize_t n = lengths.len / 4;
    if (n > PY_SSIZE_T_MAX / HASH_SIZE) {
        PyErr_NoMemory();
        goto done;
    }
    PyObject *hashes = PyBytes_FromStringAndSize(NULL, n * HASH_SIZE);
    if (hashes == NULL) {
        goto done;
    }
    int ascending = 1, failed;
    Py_BEGIN_ALLOW_THREADS
    failed = hash_entries(lengths.buf, n, data.buf, data.len, key_start, key_end,
                          (unsigned char *)PyBytes_AS_STRING(hashes), &ascending);
    Py_END_ALLOW_THREADS
    if (failed) {
        Py_DECREF(hashes);
        result = Py_NewRef(Py_None);
        goto done;
    }
    result = Py_BuildValue("(NO)", hashes, ascending ? Py_True : Py_False);
done:
    PyBuffer_Release(&lengths);
    PyBuffer_Release(&data);
    return result;
}

/* The root over `n` >= 1 hashes in `level` (overwritten): neighbours paired level by level, an odd last node
 * promoted unchanged, which builds exactly RFC 9162's tree. */
static void fold(unsigned char *level, Py_ssize_t n, unsigned char *root) {
    SHA256_CTX prefixed, ctx;
    SHA256_Init(&prefixed);
    SHA256_Update(&prefixed, &NODE_PREFIX, 1);
    while (n > 1) {
        Py_ssize_t parents = n / 2;
        for (Py_ssize_t j = 0; j < parents; j++) {
            ctx = prefixed;
            SHA256_Update(&ctx, level + 2 * j * HASH_SIZE, 2 * HASH_SIZE);
            SHA256_Final(level + j * HASH_SIZE, &ctx);
        }
        if (n & 1) {
            memmove(level + parents * HASH_SIZE, level + (n - 1) * HASH_SIZE, HASH_SIZE);
            parents++;
        }
        n = parents;
    }
    memcpy(root, level, HASH_SIZE);
}

static PyObject *packed_root(PyObject *module, PyObject *arg) {
    Py_buffer hashes;
    if (PyObject_GetBuffer(arg, &hashes, PyBUF_SIMPLE) < 0) {
        return NULL;
    }
    PyObject *result = NULL;
    if (hashes.len == 0 || hashes.len % HASH_SIZE != 0) {
        PyErr_Format(PyExc_ValueError, "leaf hashes must be a non-empty run of %d-byte hashes", HASH_SIZE);
        goto done;
    }
    unsigned char *level = PyMem_RawMalloc((size_t)hashes.len);
    if (level == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    unsigned char root[HASH_SIZE];
    Py_BEGIN_ALLOW_THREADS
    memcpy(level, hashes.buf, (size_t)hashes.len);
    fold(level, hashes.len / HASH_SIZE, root);
    Py_END_ALLOW_THREADS
    PyMem_RawFree(level);
    result = PyBytes_FromStringAndSize((const char *)root, HASH_SIZE);
done:
    PyBuffer_Release(&hashes);
    return result;
}

static PyMethodDef methods[] = {
    {"packed_leaf_hashes", packed_leaf_hashes, METH_VARARGS,
     "packed_leaf_hashes(lengths, data, key_start, key_end) -> (hashes, keys_ascending) | None"},
    {"packed_root", packed_root, METH_O, "packed_root(hashes) -> root"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "caracald.core._merkle_native", "Merkle hashing in C (see merkle.py).", 0, methods,
};

PyMODINIT_FUNC PyInit__merkle_native(void) { return PyModule_Create(&module); }
