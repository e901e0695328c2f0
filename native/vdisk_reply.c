/*
 * The answering half of the FUSE transport: the handle a request travels to JS
 * in, and the reply*() functions JS answers it with. Every request is
 * answered exactly once: a second reply is refused with an exception, and a
 * reply whose arguments cannot be converted answers EIO (answer_bad_reply).
 * No double from JS is cast to an integer type unless it is an integer in that
 * type's range.
 */
#define FUSE_USE_VERSION 35
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include "vdisk_addon.h"

void free_req_handle(napi_env env, void *data, void *hint) {
  (void)env;
  (void)hint;
  free(data);
}

/*
 * The request a reply*() call answers, marked answered from here on: the
 * caller must answer it on every path (answer_bad_reply at worst). NULL, with
 * an exception pending, if `v` is no request handle or was answered already.
 */
static fuse_req_t take_req(napi_env env, napi_value v) {
  void *p = NULL;
  req_handle *h;
  if (napi_get_value_external(env, v, &p) != napi_ok || p == NULL ||
      ((req_handle *)p)->magic != REQ_HANDLE_MAGIC) {
    napi_throw_type_error(env, "ERR_VDISK_ARG", "expected a FUSE request handle");
    return NULL;
  }
  h = p;
  if (h->answered) {
    napi_throw_error(env, "ERR_VDISK_ANSWERED", "this FUSE request was answered already; the second reply was not sent");
    return NULL;
  }
  h->answered = true;
  return h->req;
}

/*
 * A reply whose arguments cannot be converted still answers the kernel, with
 * EIO: the process doing the I/O would otherwise wait forever. JS then hears
 * of it as an ERR_VDISK_REPLY_ARG exception (replacing any exception a getter
 * threw while the arguments were read).
 */
static napi_value answer_bad_reply(napi_env env, fuse_req_t req, const char *what) {
  bool pending = false;
  char text[256];
  fuse_reply_err(req, EIO);
  napi_is_exception_pending(env, &pending);
  if (pending) {
    napi_value exc;
    napi_get_and_clear_last_exception(env, &exc);
  }
  snprintf(text, sizeof text, "%s; answered EIO", what);
  napi_throw_type_error(env, "ERR_VDISK_REPLY_ARG", text);
  return NULL;
}

/* ---- replies ----
 * Each reply*(req, ...) answers `req` exactly once on every path once the
 * handle is taken: with what JS asked for, or with EIO (answer_bad_reply) if
 * an argument is not what the kernel can be told. */

/* An errno the kernel takes: 0..511 (it drops a reply with -512 or lower, and
 * the request waits forever; libfuse turns positive values into ERANGE). */
#define ERRNO_LIMIT 512.0

/*
 * The common shape of a reply carrying one integer: take the request, then
 * the integer in [lo, hi). False when the handle could not be taken
 * (take_req has thrown) or the integer was bad (then the request is already
 * answered EIO and the usage thrown): the caller replies only on true.
 */
static bool take_req_integer(napi_env env, napi_callback_info info, double lo, double hi, const char *usage, fuse_req_t *req, int64_t *out) {
  size_t argc = 2;
  napi_value argv[2];
  *req = NULL;
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok) {
    throw_last_error(env);
    return false;
  }
  if (!(*req = take_req(env, argv[0]))) return false;
  if (get_integer(env, argv[1], lo, hi, out)) return true;
  answer_bad_reply(env, *req, usage);
  return false;
}

static napi_value js_reply_err(napi_env env, napi_callback_info info) {
  fuse_req_t req;
  int64_t err;
  if (take_req_integer(env, info, 0, ERRNO_LIMIT, "replyErr(req, errno): errno must be an integer from 0 to 511", &req, &err))
    fuse_reply_err(req, (int)err);
  return NULL;
}


/* replyRead(req, buffers[]): the kernel copies straight out of the JS buffers. */
static napi_value js_reply_read(napi_env env, napi_callback_info info) {
  size_t argc = 2;
  napi_value argv[2];
  uint32_t n;
  struct iovec iov[MAX_REPLY_IOV];
  const char *bad;
  fuse_req_t req;
  NAPI_CALL(env, napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  if (!(req = take_req(env, argv[0]))) return NULL;
  if ((bad = get_iovec(env, argv[1], iov, &n))) return answer_bad_reply(env, req, bad);
  fuse_reply_iov(req, iov, (int)n);
  return NULL;
}

/*
 * replyReadAsync(req, buffers[]) -> Promise: the same reply, written to
 * /dev/fuse from a thread-pool thread. The kernel's copy of a large reply into
 * the page cache is the biggest single cost on the loop thread; off it, the
 * loop keeps taking network data and requests while the copy runs. libfuse
 * replies are thread-safe (its own multi-threaded loop replies from any
 * thread). The buffers are held by a reference until the copy is done.
 */
typedef struct {
  fuse_req_t req;
  int count;
  struct iovec iov[MAX_REPLY_IOV];
  napi_ref buffers;
  napi_deferred deferred;
  napi_async_work work;
} read_reply;

static void read_reply_execute(napi_env env, void *data) {
  (void)env;
  read_reply *r = data;
  fuse_reply_iov(r->req, r->iov, r->count);
}

static void read_reply_complete(napi_env env, napi_status status, void *data) {
  read_reply *r = data;
  napi_value undefined;
  (void)status; /* the request is answered (or its reply failed in the kernel) either way */
  napi_delete_reference(env, r->buffers);
  napi_get_undefined(env, &undefined);
  napi_resolve_deferred(env, r->deferred, undefined);
  napi_delete_async_work(env, r->work);
  free(r);
}

static napi_value js_reply_read_async(napi_env env, napi_callback_info info) {
  size_t argc = 2;
  napi_value argv[2], promise, name;
  uint32_t n;
  const char *bad;
  fuse_req_t req;
  read_reply *r;
  NAPI_CALL(env, napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  if (!(req = take_req(env, argv[0]))) return NULL;
  if (!(r = calloc(1, sizeof *r))) return answer_bad_reply(env, req, "out of memory answering a read");
  if ((bad = get_iovec(env, argv[1], r->iov, &n))) {
    free(r);
    return answer_bad_reply(env, req, bad);
  }
  r->req = req;
  r->count = (int)n;
  if (napi_create_reference(env, argv[1], 1, &r->buffers) != napi_ok) {
    free(r);
    return answer_bad_reply(env, req, "cannot hold the buffers of a read reply");
  }
  if (napi_create_promise(env, &r->deferred, &promise) != napi_ok ||
      napi_create_string_utf8(env, "vdisk:reply", NAPI_AUTO_LENGTH, &name) != napi_ok ||
      napi_create_async_work(env, NULL, name, read_reply_execute, read_reply_complete, r, &r->work) != napi_ok ||
      napi_queue_async_work(env, r->work) != napi_ok) {
    /* Not queued: answer here instead, so the request is never left unanswered. */
    fuse_reply_iov(req, r->iov, r->count);
    if (r->work) napi_delete_async_work(env, r->work);
    napi_delete_reference(env, r->buffers);
    free(r);
    throw_last_error(env);
    return NULL;
  }
  return promise;
}

/* replyWrite(req, count): count is at most the size written, which the kernel checks. */
static napi_value js_reply_write(napi_env env, napi_callback_info info) {
  fuse_req_t req;
  int64_t count;
  if (take_req_integer(env, info, 0, UINT32_LIMIT, "replyWrite(req, count): count must be an integer from 0 to 2^32-1", &req, &count))
    fuse_reply_write(req, (size_t)count);
  return NULL;
}

static napi_value js_reply_lseek(napi_env env, napi_callback_info info) {
  fuse_req_t req;
  int64_t off;
  if (take_req_integer(env, info, 0, INT64_LIMIT, "replyLseek(req, offset): offset must be an integer from 0 to 2^63-1", &req, &off))
    fuse_reply_lseek(req, (off_t)off);
  return NULL;
}

/* replyOpen(req, directIo, keepCache) */
static napi_value js_reply_open(napi_env env, napi_callback_info info) {
  size_t argc = 3;
  napi_value argv[3];
  bool direct_io, keep_cache;
  struct fuse_file_info fi;
  fuse_req_t req;
  NAPI_CALL(env, napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  if (!(req = take_req(env, argv[0]))) return NULL;
  if (napi_get_value_bool(env, argv[1], &direct_io) != napi_ok ||
      napi_get_value_bool(env, argv[2], &keep_cache) != napi_ok)
    return answer_bad_reply(env, req, "replyOpen(req, directIo, keepCache): flags must be booleans");
  memset(&fi, 0, sizeof fi);
  fi.direct_io = direct_io;
  fi.keep_cache = keep_cache;
  fuse_reply_open(req, &fi);
  return NULL;
}

/* Milliseconds since 1970 (|ms| <= MAX_TIME_MS) as a timespec, rounding down before 1970 too. */
static struct timespec ms_to_timespec(double ms) {
  struct timespec ts;
  int64_t sec = (int64_t)(ms / 1e3);
  double nsec;
  if ((double)sec * 1e3 > ms) sec--;
  nsec = (ms - (double)sec * 1e3) * 1e6;
  ts.tv_sec = (time_t)sec;
  ts.tv_nsec = nsec < 0 ? 0 : nsec > 999999999.0 ? 999999999L : (long)nsec;
  return ts;
}

/* replyAttr(req, [size, blocks, blksize, mode, uid, gid, atimeMs, mtimeMs, ctimeMs], timeoutSec) */
static napi_value js_reply_attr(napi_env env, napi_callback_info info) {
  size_t argc = 3;
  napi_value argv[3];
  double f[9], timeout;
  struct stat st;
  fuse_req_t req;
  NAPI_CALL(env, napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  if (!(req = take_req(env, argv[0]))) return NULL;
  if (!get_numbers(env, argv[1], f, 9) || napi_get_value_double(env, argv[2], &timeout) != napi_ok ||
      !is_integer_in(f[0], 0, INT64_LIMIT) || !is_integer_in(f[1], 0, INT64_LIMIT) ||
      !is_integer_in(f[2], 0, UINT32_LIMIT) || !is_integer_in(f[3], 0, UINT32_LIMIT) ||
      !is_integer_in(f[4], 0, UINT32_LIMIT) || !is_integer_in(f[5], 0, UINT32_LIMIT) ||
      !(f[6] >= -MAX_TIME_MS && f[6] <= MAX_TIME_MS) || !(f[7] >= -MAX_TIME_MS && f[7] <= MAX_TIME_MS) ||
      !(f[8] >= -MAX_TIME_MS && f[8] <= MAX_TIME_MS) || !(timeout >= 0 && timeout <= 1e9))
    return answer_bad_reply(env, req, "replyAttr(req, attr, timeout): attr must be 9 numbers in range "
                                      "(size, blocks, blksize, mode, uid, gid as integers; times in ms)");
  memset(&st, 0, sizeof st);
  st.st_ino = FUSE_ROOT_ID;
  st.st_nlink = 1;
  st.st_size = (off_t)f[0];
  st.st_blocks = (blkcnt_t)f[1];
  st.st_blksize = (blksize_t)f[2];
  st.st_mode = (mode_t)f[3];
  st.st_uid = (uid_t)f[4];
  st.st_gid = (gid_t)f[5];
  st.st_atim = ms_to_timespec(f[6]);
  st.st_mtim = ms_to_timespec(f[7]);
  st.st_ctim = ms_to_timespec(f[8]);
  fuse_reply_attr(req, &st, timeout);
  return NULL;
}

/* replyStatfs(req, [bsize, blocks, bfree, bavail, files, ffree, namemax]) */
static napi_value js_reply_statfs(napi_env env, napi_callback_info info) {
  size_t argc = 2;
  napi_value argv[2];
  double f[7];
  struct statvfs sv;
  fuse_req_t req;
  NAPI_CALL(env, napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  if (!(req = take_req(env, argv[0]))) return NULL;
  if (!get_numbers(env, argv[1], f, 7) || !is_integer_in(f[0], 1, UINT32_LIMIT) ||
      !is_integer_in(f[1], 0, INT64_LIMIT) || !is_integer_in(f[2], 0, INT64_LIMIT) ||
      !is_integer_in(f[3], 0, INT64_LIMIT) || !is_integer_in(f[4], 0, INT64_LIMIT) ||
      !is_integer_in(f[5], 0, INT64_LIMIT) || !is_integer_in(f[6], 0, UINT32_LIMIT))
    return answer_bad_reply(env, req, "replyStatfs(req, statfs): statfs must be 7 non-negative integers, bsize > 0");
  memset(&sv, 0, sizeof sv);
  sv.f_bsize = sv.f_frsize = (unsigned long)f[0];
  sv.f_blocks = (fsblkcnt_t)f[1];
  sv.f_bfree = (fsblkcnt_t)f[2];
  sv.f_bavail = (fsblkcnt_t)f[3];
  sv.f_files = (fsfilcnt_t)f[4];
  sv.f_ffree = sv.f_favail = (fsfilcnt_t)f[5];
  sv.f_namemax = (unsigned long)f[6];
  fuse_reply_statfs(req, &sv);
  return NULL;
}

napi_status vdisk_register_replies(napi_env env, napi_value exports) {
  static const vdisk_function fns[] = {
      {"replyErr", js_reply_err},       {"replyRead", js_reply_read},
      {"replyReadAsync", js_reply_read_async},
      {"replyWrite", js_reply_write},   {"replyLseek", js_reply_lseek},
      {"replyOpen", js_reply_open},     {"replyAttr", js_reply_attr},
      {"replyStatfs", js_reply_statfs},
  };
  return vdisk_register_functions(env, exports, fns, sizeof fns / sizeof fns[0]);
}
