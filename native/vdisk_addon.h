/*
 * What the vdisk addon's C files share: N-API error and argument helpers
 * (vdisk_addon.c), the request handle the FUSE session hands JS and the
 * reply*() functions take back (vdisk_reply.c), and each file's registration
 * of its functions on the addon's exports.
 */
#ifndef VDISK_ADDON_H
#define VDISK_ADDON_H
#include <fuse_lowlevel.h>
#include <node_api.h>
#include <limits.h>
#include <stdbool.h>
#include <stdint.h>
#include <sys/uio.h>

/* ---- N-API error checking (in the style of node's js-native-api common.h) ---- */

void throw_last_error(napi_env env);

#define NAPI_CALL(env, call)                                                                   \
  do {                                                                                         \
    if ((call) != napi_ok) {                                                                   \
      throw_last_error(env);                                                                   \
      return NULL;                                                                             \
    }                                                                                          \
  } while (0)

/* Used where no JS caller can receive an exception (libuv and libfuse callbacks). */
#define NAPI_CHECK_GOTO(call, label)                                                           \
  do {                                                                                         \
    if ((call) != napi_ok) goto label;                                                         \
  } while (0)

/* Throw an Error whose .code is the errno name ("ENOENT") and .errno is -errno, like Node's fs. */
napi_value throw_errno(napi_env env, int err, const char *syscall);

/* ---- argument helpers ---- */

/* 2^63: the first double past INT64_MAX (and past off_t's range). */
#define INT64_LIMIT 9223372036854775808.0
/* 2^32: the first double past the kernel's 32-bit fields (uid, mode, write count). */
#define UINT32_LIMIT 4294967296.0
/* The range of a JS Date, in ms either side of 1970. */
#define MAX_TIME_MS 8.64e15

/* An integer in [lo, hi), hi <= 2^63 and lo >= -2^63; false for NaN, infinities and fractions.
 * The cast only happens once the range is known, so it is always defined. */
static inline bool is_integer_in(double d, double lo, double hi) {
  return d >= lo && d < hi && (double)(int64_t)d == d;
}

/* A JS number that is an integer in [lo, hi) (see is_integer_in); false for anything else. */
bool get_integer(napi_env env, napi_value v, double lo, double hi, int64_t *out);

/*
 * A JS string into out[cap], NUL-terminated; false if it is not a string or
 * does not fit (a path cut short would name another file).
 */
bool get_string(napi_env env, napi_value v, char *out, size_t cap);

/* The first `count` elements of a JS array, as numbers; false if it is not an array of numbers. */
bool get_numbers(napi_env env, napi_value array, double *out, uint32_t count);

#define MAX_REPLY_IOV 256

/* An array of Buffers as an iovec (at most MAX_REPLY_IOV): NULL, or what is wrong with it. */
const char *get_iovec(napi_env env, napi_value array, struct iovec *iov, uint32_t *count);

/* ---- request handles (vdisk_reply.c) ---- */

#define REQ_HANDLE_MAGIC 0x7664726571ULL /* "vdreq": tells a request handle from a session handle */

/*
 * What JS holds for one request. libfuse frees a request when it is answered,
 * so the handle remembers that it was: a second reply then throws instead of
 * touching freed memory. The handle itself lives until JS drops it.
 */
typedef struct {
  uint64_t magic;
  fuse_req_t req;
  bool answered;
} req_handle;

/* The finalizer of a request handle's external value. */
void free_req_handle(napi_env env, void *data, void *hint);

/* ---- each file's functions on the addon's exports ---- */

napi_status vdisk_register_fuse(napi_env env, napi_value exports);
napi_status vdisk_register_replies(napi_env env, napi_value exports);
napi_status vdisk_register_host(napi_env env, napi_value exports);

/* Registers `count` functions on `exports` under their names. */
typedef struct {
  const char *name;
  napi_callback fn;
} vdisk_function;
napi_status vdisk_register_functions(napi_env env, napi_value exports, const vdisk_function *fns, size_t count);

#endif
