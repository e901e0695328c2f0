/*
 * vdisk native addon: a libfuse3 low-level session driven from Node's own
 * event loop, plus the host-file calls Node lacks (fallocate, SEEK_DATA/HOLE,
 * umount2).
 *
 * Transport only, no policy. The session fd is watched with uv_poll on the
 * main thread (as QEMU's FUSE export watches it from its AioContext), each
 * request is handed to a JS function synchronously, and JS answers later with
 * one of the reply*() functions. There are no FUSE worker threads, so no
 * thread hop per request and no locking.
 *
 * Invariants:
 *  - every request handed to JS is answered exactly once: by JS (the TS wrapper
 *    guarantees it), by a reply*() call whose arguments cannot be converted
 *    (it answers EIO, then throws), or by C itself (EIO) if calling into JS
 *    fails; a second reply is refused with an exception, never sent;
 *  - no double from JS is cast to an integer type unless it is an integer in
 *    that type's range (casting NaN or 1e30 to off_t is undefined behaviour);
 *  - write data lives in libfuse's receive buffer, which the next receive
 *    overwrites, so it is copied into a JS Buffer before JS sees it;
 *  - a fuse_req_t travels to JS inside a small handle (an external value) that
 *    remembers whether it was answered; JS's garbage collector frees it.
 */
#define FUSE_USE_VERSION 35
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <fuse_lowlevel.h>
#include <node_api.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>
#include <uv.h>
#include "vdisk_peercred.h"

/* ---- N-API error checking (in the style of node's js-native-api common.h) ---- */

static void throw_last_error(napi_env env) {
  const napi_extended_error_info *info = NULL;
  bool pending = false;
  napi_get_last_error_info(env, &info);
  napi_is_exception_pending(env, &pending);
  if (!pending) {
    napi_throw_error(env, "ERR_VDISK_NAPI",
                     info && info->error_message ? info->error_message : "N-API call failed");
  }
}

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
static napi_value throw_errno(napi_env env, int err, const char *syscall) {
  napi_value code, msg, error, errnum;
  char text[256];
  snprintf(text, sizeof text, "%s: %s", syscall, strerror(err));
  if (napi_create_string_utf8(env, uv_err_name(-err), NAPI_AUTO_LENGTH, &code) != napi_ok ||
      napi_create_string_utf8(env, text, NAPI_AUTO_LENGTH, &msg) != napi_ok ||
      napi_create_error(env, code, msg, &error) != napi_ok ||
      napi_create_int32(env, -err, &errnum) != napi_ok ||
      napi_set_named_property(env, error, "errno", errnum) != napi_ok) {
    throw_last_error(env);
    return NULL;
  }
  napi_throw(env, error);
  return NULL;
}

/* ---- argument helpers ---- */

/* 2^63: the first double past INT64_MAX (and past off_t's range). */
#define INT64_LIMIT 9223372036854775808.0
/* 2^32: the first double past the kernel's 32-bit fields (uid, mode, write count). */
#define UINT32_LIMIT 4294967296.0
/* The range of a JS Date, in ms either side of 1970. */
#define MAX_TIME_MS 8.64e15

/* An integer in [lo, hi), hi <= 2^63 and lo >= -2^63; false for NaN, infinities and fractions.
 * The cast only happens once the range is known, so it is always defined. */
static bool is_integer_in(double d, double lo, double hi) {
  return d >= lo && d < hi && (double)(int64_t)d == d;
}

/* A JS number that is an integer in [lo, hi) (see is_integer_in); false for anything else. */
static bool get_integer(napi_env env, napi_value v, double lo, double hi, int64_t *out) {
  double d;
  if (napi_get_value_double(env, v, &d) != napi_ok || !is_integer_in(d, lo, hi)) return false;
  *out = (int64_t)d;
  return true;
}

/* The first `count` elements of a JS array, as numbers; false if it is not an array of numbers. */
static bool get_numbers(napi_env env, napi_value array, double *out, uint32_t count) {
  bool is_array = false;
  uint32_t len;
  if (napi_is_array(env, array, &is_array) != napi_ok || !is_array ||
      napi_get_array_length(env, array, &len) != napi_ok || len < count)
    return false;
  for (uint32_t i = 0; i < count; i++) {
    napi_value v;
    if (napi_get_element(env, array, i, &v) != napi_ok || napi_get_value_double(env, v, &out[i]) != napi_ok)
      return false;
  }
  return true;
}

/* ---- request handles ---- */

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

static void free_req_handle(napi_env env, void *data, void *hint) {
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

/* ---- the session ---- */

enum {
  OP_GETATTR,
  OP_SETATTR,
  OP_OPEN,
  OP_RELEASE,
  OP_READ,
  OP_WRITE,
  OP_FLUSH,
  OP_FSYNC,
  OP_FALLOCATE,
  OP_LSEEK,
  OP_STATFS,
  OP_COUNT
};

static const char *const op_names[OP_COUNT] = {
    "getattr", "setattr", "open",      "release", "read",  "write",
    "flush",   "fsync",   "fallocate", "lseek",   "statfs"};

typedef struct {
  napi_env env;
  struct fuse_session *se;
  uv_poll_t poll;
  struct fuse_buf buf;
  napi_ref handlers[OP_COUNT];
  napi_ref on_exit;
  napi_ref resource;
  napi_async_context async_context;
  uint32_t max_write;
  uint32_t max_readahead;
  int polling;
  int closing;
} vd_session;

static void dispatch(vd_session *s, int op, fuse_req_t req, size_t argc, napi_value *argv) {
  napi_env env = s->env;
  napi_value fn, global, result;
  req_handle *h;
  if (s->handlers[op] == NULL) {
    fuse_reply_err(req, ENOSYS);
    return;
  }
  if (!(h = malloc(sizeof *h))) {
    fuse_reply_err(req, ENOMEM);
    return;
  }
  h->magic = REQ_HANDLE_MAGIC;
  h->req = req;
  h->answered = false;
  if (napi_create_external(env, h, free_req_handle, NULL, &argv[0]) != napi_ok) {
    free(h);
    h = NULL;
    goto fail;
  }
  NAPI_CHECK_GOTO(napi_get_reference_value(env, s->handlers[op], &fn), fail);
  NAPI_CHECK_GOTO(napi_get_global(env, &global), fail);
  if (napi_call_function(env, global, fn, argc, argv, &result) != napi_ok) goto fail;
  return;
fail: {
  /* The JS wrapper never throws; if it did, answer so the kernel request does
   * not hang, unless a reply went out before the exception (h->answered). */
  bool pending = false;
  napi_value exc;
  napi_is_exception_pending(env, &pending);
  if (pending) napi_get_and_clear_last_exception(env, &exc);
  if (h && h->answered) return;
  if (h) h->answered = true;
  fprintf(stderr, "vdisk: internal error dispatching %s to JS; answered EIO\n", op_names[op]);
  fuse_reply_err(req, EIO);
}
}

static napi_value num(napi_env env, double d) {
  napi_value v = NULL;
  napi_create_double(env, d, &v);
  return v;
}

static void ll_init(void *userdata, struct fuse_conn_info *conn) {
  vd_session *s = userdata;
  /* Large requests: libfuse derives max_pages from max_write. */
  if (s->max_write && s->max_write < conn->max_write) conn->max_write = s->max_write;
  /* Must equal the max_read mount option, which the TS side sets to maxWrite. */
  if (s->max_write) conn->max_read = s->max_write;
  if (s->max_readahead) conn->max_readahead = s->max_readahead;
  conn->max_background = 64;
  conn->congestion_threshold = 48;
  /* O_TRUNC arrives as an open flag instead of a setattr(size=0): a disk ignores it. */
  if (conn->capable & FUSE_CAP_ATOMIC_O_TRUNC) conn->want |= FUSE_CAP_ATOMIC_O_TRUNC;
  /* All writes pass through the kernel, so its page cache stays coherent on its own;
   * dropping it whenever mtime moves would only cost re-reads. */
  conn->want &= ~FUSE_CAP_AUTO_INVAL_DATA;
  /* Write-through: a write() returns once vdisk has it, fsync() means durable. */
  conn->want &= ~(FUSE_CAP_WRITEBACK_CACHE | FUSE_CAP_SPLICE_READ | FUSE_CAP_SPLICE_WRITE |
                  FUSE_CAP_SPLICE_MOVE);
}

static void ll_getattr(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi) {
  (void)ino;
  (void)fi;
  napi_value argv[1];
  dispatch(fuse_req_userdata(req), OP_GETATTR, req, 1, argv);
}

static void ll_setattr(fuse_req_t req, fuse_ino_t ino, struct stat *attr, int to_set,
                       struct fuse_file_info *fi) {
  (void)ino;
  (void)fi;
  vd_session *s = fuse_req_userdata(req);
  napi_env env = s->env;
  napi_value argv[7] = {NULL,
                        num(env, to_set),
                        num(env, (double)attr->st_size),
                        num(env, attr->st_mode),
                        num(env, attr->st_uid),
                        num(env, attr->st_gid),
                        num(env, (double)attr->st_mtim.tv_sec * 1e3 + attr->st_mtim.tv_nsec / 1e6)};
  dispatch(s, OP_SETATTR, req, 7, argv);
}

static void ll_open(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi) {
  (void)ino;
  vd_session *s = fuse_req_userdata(req);
  napi_value argv[2] = {NULL, num(s->env, fi->flags)};
  dispatch(s, OP_OPEN, req, 2, argv);
}

static void ll_release(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi) {
  (void)ino;
  (void)fi;
  napi_value argv[1];
  dispatch(fuse_req_userdata(req), OP_RELEASE, req, 1, argv);
}

static void ll_read(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off,
                    struct fuse_file_info *fi) {
  (void)ino;
  (void)fi;
  vd_session *s = fuse_req_userdata(req);
  napi_value argv[3] = {NULL, num(s->env, (double)off), num(s->env, (double)size)};
  dispatch(s, OP_READ, req, 3, argv);
}

/* Writes this large are handed to JS in the receive buffer itself (see ll_write). */
#define STEAL_WRITE_MIN_BYTES (256 * 1024)

static void free_receive_buffer(napi_env env, void *data, void *mem) {
  (void)env;
  (void)data;
  free(mem);
}

static void ll_write(fuse_req_t req, fuse_ino_t ino, const char *buf, size_t size, off_t off,
                     struct fuse_file_info *fi) {
  (void)ino;
  (void)fi;
  vd_session *s = fuse_req_userdata(req);
  napi_value argv[3] = {NULL, num(s->env, (double)off), NULL};
  void *copy;
  char *mem = s->buf.mem;
  /* buf points into the receive buffer, which the next request overwrites. A
   * large write takes the whole receive buffer instead (libfuse allocates a new
   * one for the next request), which saves copying every byte; a small one is
   * cheaper to copy than a fresh buffer is to allocate. */
  if (size >= STEAL_WRITE_MIN_BYTES && mem && buf >= mem && buf + size <= mem + s->buf.size &&
      napi_create_external_buffer(s->env, size, (void *)buf, free_receive_buffer, mem, &argv[2]) == napi_ok) {
    s->buf.mem = NULL;
  } else if (napi_create_buffer_copy(s->env, size, buf, &copy, &argv[2]) != napi_ok) {
    bool pending = false;
    napi_value exc;
    napi_is_exception_pending(s->env, &pending);
    if (pending) napi_get_and_clear_last_exception(s->env, &exc);
    fuse_reply_err(req, ENOMEM);
    return;
  }
  dispatch(s, OP_WRITE, req, 3, argv);
}

static void ll_flush(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi) {
  (void)ino;
  (void)fi;
  napi_value argv[1];
  dispatch(fuse_req_userdata(req), OP_FLUSH, req, 1, argv);
}

static void ll_fsync(fuse_req_t req, fuse_ino_t ino, int datasync, struct fuse_file_info *fi) {
  (void)ino;
  (void)fi;
  vd_session *s = fuse_req_userdata(req);
  napi_value argv[2] = {NULL, num(s->env, datasync)};
  dispatch(s, OP_FSYNC, req, 2, argv);
}

static void ll_fallocate(fuse_req_t req, fuse_ino_t ino, int mode, off_t offset, off_t length,
                         struct fuse_file_info *fi) {
  (void)ino;
  (void)fi;
  vd_session *s = fuse_req_userdata(req);
  napi_value argv[4] = {NULL, num(s->env, mode), num(s->env, (double)offset),
                        num(s->env, (double)length)};
  dispatch(s, OP_FALLOCATE, req, 4, argv);
}

static void ll_lseek(fuse_req_t req, fuse_ino_t ino, off_t off, int whence,
                     struct fuse_file_info *fi) {
  (void)ino;
  (void)fi;
  vd_session *s = fuse_req_userdata(req);
  napi_value argv[3] = {NULL, num(s->env, (double)off), num(s->env, whence)};
  dispatch(s, OP_LSEEK, req, 3, argv);
}

static void ll_statfs(fuse_req_t req, fuse_ino_t ino) {
  (void)ino;
  napi_value argv[1];
  dispatch(fuse_req_userdata(req), OP_STATFS, req, 1, argv);
}

static const struct fuse_lowlevel_ops ll_ops = {
    .init = ll_init,
    .getattr = ll_getattr,
    .setattr = ll_setattr,
    .open = ll_open,
    .release = ll_release,
    .read = ll_read,
    .write = ll_write,
    .flush = ll_flush,
    .fsync = ll_fsync,
    .fallocate = ll_fallocate,
    .lseek = ll_lseek,
    .statfs = ll_statfs,
};

/* Tell JS the session is over (unmounted, or the connection was aborted). */
static void notify_exit(vd_session *s, int err) {
  napi_env env = s->env;
  napi_value fn, global, result, arg;
  if (s->on_exit == NULL) return;
  if (napi_get_reference_value(env, s->on_exit, &fn) != napi_ok || fn == NULL) return;
  if (napi_get_global(env, &global) != napi_ok) return;
  arg = num(env, err);
  if (napi_call_function(env, global, fn, 1, &arg, &result) != napi_ok) {
    bool pending = false;
    napi_value exc;
    napi_is_exception_pending(env, &pending);
    if (pending) napi_get_and_clear_last_exception(env, &exc);
  }
}

/* Bound the work done per wake-up so timers and completions still get their turn. */
#define MAX_REQUESTS_PER_WAKEUP 64

static void on_readable(uv_poll_t *handle, int status, int events) {
  (void)events;
  vd_session *s = handle->data;
  napi_env env = s->env;
  napi_handle_scope scope;
  napi_callback_scope cb_scope;
  napi_value resource;
  int exit_err = 0, stop = 0;

  if (napi_open_handle_scope(env, &scope) != napi_ok) return;
  /* One callback scope per wake-up: promise continuations started by the
   * handlers run when it closes, as after any libuv callback. */
  if (napi_get_reference_value(env, s->resource, &resource) != napi_ok ||
      napi_open_callback_scope(env, resource, s->async_context, &cb_scope) != napi_ok) {
    napi_close_handle_scope(env, scope);
    return;
  }
  if (status < 0) {
    exit_err = EIO;
    stop = 1;
  }
  for (int i = 0; !stop && i < MAX_REQUESTS_PER_WAKEUP; i++) {
    int res = fuse_session_receive_buf(s->se, &s->buf);
    if (res == -EAGAIN || res == -EINTR) break;
    if (res <= 0) {
      if (!fuse_session_exited(s->se)) exit_err = res < 0 ? -res : EIO;
      stop = 1;
      break;
    }
    fuse_session_process_buf(s->se, &s->buf);
    if (fuse_session_exited(s->se)) stop = 1;
  }
  if (stop && s->polling) {
    uv_poll_stop(&s->poll);
    s->polling = 0;
    notify_exit(s, exit_err);
  }
  napi_close_callback_scope(env, cb_scope);
  napi_close_handle_scope(env, scope);
}

static void on_poll_closed(uv_handle_t *handle) {
  vd_session *s = handle->data;
  napi_env env = s->env;
  /* The poll handle is closed, so the fd may go now. If the kernel already ended
   * the connection this only closes the fd; otherwise it detaches the mount. */
  fuse_session_unmount(s->se);
  fuse_session_destroy(s->se);
  free(s->buf.mem);
  for (int i = 0; i < OP_COUNT; i++)
    if (s->handlers[i]) napi_delete_reference(env, s->handlers[i]);
  if (s->on_exit) napi_delete_reference(env, s->on_exit);
  if (s->resource) napi_delete_reference(env, s->resource);
  napi_async_destroy(env, s->async_context);
  free(s);
}

static int append_opt(char *dst, size_t cap, const char *opt) {
  size_t len = strlen(dst);
  int n = snprintf(dst + len, cap - len, "%s%s", len ? "," : "", opt);
  return n < 0 || (size_t)n >= cap - len ? -1 : 0;
}

static int get_named_string(napi_env env, napi_value obj, const char *name, char *out, size_t cap) {
  napi_value v;
  napi_valuetype t;
  size_t len;
  out[0] = 0;
  if (napi_get_named_property(env, obj, name, &v) != napi_ok) return -1;
  if (napi_typeof(env, v, &t) != napi_ok) return -1;
  if (t == napi_undefined) return 0;
  if (napi_get_value_string_utf8(env, v, out, cap, &len) != napi_ok) return -1;
  return len + 1 >= cap ? -1 : 0;
}

static int get_named_uint(napi_env env, napi_value obj, const char *name, uint32_t *out) {
  napi_value v;
  napi_valuetype t;
  *out = 0;
  if (napi_get_named_property(env, obj, name, &v) != napi_ok) return -1;
  if (napi_typeof(env, v, &t) != napi_ok) return -1;
  if (t == napi_undefined) return 0;
  return napi_get_value_uint32(env, v, out) == napi_ok ? 0 : -1;
}

/*
 * mount(mountpoint, options, handlers, onExit) -> session handle
 * options: { fsOptions: "fsname=..,ro,allow_other,...", maxWrite, maxReadahead }
 * handlers: { getattr(req), read(req, offset, size), ... } — missing ones answer ENOSYS.
 */
static napi_value js_mount(napi_env env, napi_callback_info info) {
  size_t argc = 4;
  napi_value argv[4], result, resource_name;
  char mountpoint[4096], fs_options[2048], opts[2300];
  size_t len;
  vd_session *s;
  uv_loop_t *loop;
  struct fuse_args args = FUSE_ARGS_INIT(0, NULL);

  NAPI_CALL(env, napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  if (argc < 4) {
    napi_throw_type_error(env, "ERR_VDISK_ARG", "mount(mountpoint, options, handlers, onExit)");
    return NULL;
  }
  NAPI_CALL(env, napi_get_value_string_utf8(env, argv[0], mountpoint, sizeof mountpoint, &len));
  if (get_named_string(env, argv[1], "fsOptions", fs_options, sizeof fs_options) < 0) {
    napi_throw_type_error(env, "ERR_VDISK_ARG", "options.fsOptions must be a short string");
    return NULL;
  }
  s = calloc(1, sizeof *s);
  if (!s) return throw_errno(env, ENOMEM, "calloc");
  s->env = env;
  if (get_named_uint(env, argv[1], "maxWrite", &s->max_write) < 0 ||
      get_named_uint(env, argv[1], "maxReadahead", &s->max_readahead) < 0) {
    free(s);
    napi_throw_type_error(env, "ERR_VDISK_ARG", "options.maxWrite/maxReadahead must be numbers");
    return NULL;
  }
  for (int i = 0; i < OP_COUNT; i++) {
    napi_value fn;
    napi_valuetype t;
    if (napi_get_named_property(env, argv[2], op_names[i], &fn) != napi_ok ||
        napi_typeof(env, fn, &t) != napi_ok)
      goto fail_js;
    if (t == napi_function && napi_create_reference(env, fn, 1, &s->handlers[i]) != napi_ok)
      goto fail_js;
  }
  if (napi_create_reference(env, argv[3], 1, &s->on_exit) != napi_ok) goto fail_js;
  if (napi_create_object(env, &result) != napi_ok ||
      napi_create_reference(env, result, 1, &s->resource) != napi_ok ||
      napi_create_string_utf8(env, "vdisk:fuse", NAPI_AUTO_LENGTH, &resource_name) != napi_ok ||
      napi_async_init(env, result, resource_name, &s->async_context) != napi_ok)
    goto fail_js;

  opts[0] = 0;
  if (fs_options[0] && append_opt(opts, sizeof opts, fs_options) < 0) goto fail_js;
  if (fuse_opt_add_arg(&args, "vdisk") < 0 || fuse_opt_add_arg(&args, "-o") < 0 ||
      fuse_opt_add_arg(&args, opts[0] ? opts : "default_permissions") < 0) {
    fuse_opt_free_args(&args);
    goto fail_js;
  }
  s->se = fuse_session_new(&args, &ll_ops, sizeof ll_ops, s);
  fuse_opt_free_args(&args);
  if (!s->se) {
    napi_throw_error(env, "ERR_VDISK_FUSE_OPTIONS", "libfuse rejected the session options");
    goto fail_cleanup;
  }
  if (fuse_session_mount(s->se, mountpoint) != 0) {
    int err = errno ? errno : EIO;
    fuse_session_destroy(s->se);
    s->se = NULL;
    throw_errno(env, err, "fuse mount");
    goto fail_cleanup;
  }
  {
    int fd = fuse_session_fd(s->se);
    int fl = fcntl(fd, F_GETFL);
    if (fl < 0 || fcntl(fd, F_SETFL, fl | O_NONBLOCK) < 0 ||
        napi_get_uv_event_loop(env, &loop) != napi_ok || uv_poll_init(loop, &s->poll, fd) != 0) {
      fuse_session_unmount(s->se);
      fuse_session_destroy(s->se);
      s->se = NULL;
      throw_errno(env, EIO, "uv_poll_init");
      goto fail_cleanup;
    }
    s->poll.data = s;
    if (uv_poll_start(&s->poll, UV_READABLE, on_readable) != 0) {
      s->polling = 0;
      s->closing = 1;
      uv_close((uv_handle_t *)&s->poll, on_poll_closed);
      throw_errno(env, EIO, "uv_poll_start");
      return NULL;
    }
    s->polling = 1;
  }
  {
    napi_value handle;
    NAPI_CALL(env, napi_create_external(env, s, NULL, NULL, &handle));
    return handle;
  }

fail_js:
  throw_last_error(env);
fail_cleanup:
  for (int i = 0; i < OP_COUNT; i++)
    if (s->handlers[i]) napi_delete_reference(env, s->handlers[i]);
  if (s->on_exit) napi_delete_reference(env, s->on_exit);
  if (s->resource) napi_delete_reference(env, s->resource);
  if (s->async_context) napi_async_destroy(env, s->async_context);
  free(s);
  return NULL;
}

/* The session handle a call's first argument carries; NULL with an exception pending if it is not one. */
static vd_session *session_arg(napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value argv[1];
  void *p = NULL;
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok ||
      napi_get_value_external(env, argv[0], &p) != napi_ok || p == NULL) {
    throw_last_error(env);
    return NULL;
  }
  return p;
}

/* stop(session): take no new requests; those already handed to JS can still be
 * answered. Requests left in the kernel's queue fail once the session closes. */
static napi_value js_stop(napi_env env, napi_callback_info info) {
  vd_session *s = session_arg(env, info);
  if (!s) return NULL;
  if (s->polling && !s->closing) uv_poll_stop(&s->poll);
  s->polling = 0;
  return NULL;
}

/* close(session): stop serving and release everything. Aborts the connection if
 * the mount is still there: callers drain and detach first for a clean stop. */
static napi_value js_close(napi_env env, napi_callback_info info) {
  vd_session *s = session_arg(env, info);
  if (!s || s->closing) return NULL;
  s->closing = 1;
  if (s->polling) uv_poll_stop(&s->poll);
  s->polling = 0;
  uv_close((uv_handle_t *)&s->poll, on_poll_closed);
  return NULL;
}

/* ---- replies ----
 * Each reply*(req, ...) answers `req` exactly once on every path once the
 * handle is taken: with what JS asked for, or with EIO (answer_bad_reply) if
 * an argument is not what the kernel can be told. */

/* An errno the kernel takes: 0..511 (it drops a reply with -512 or lower, and
 * the request waits forever; libfuse turns positive values into ERANGE). */
#define ERRNO_LIMIT 512.0

static napi_value js_reply_err(napi_env env, napi_callback_info info) {
  size_t argc = 2;
  napi_value argv[2];
  int64_t err;
  fuse_req_t req;
  NAPI_CALL(env, napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  if (!(req = take_req(env, argv[0]))) return NULL;
  if (!get_integer(env, argv[1], 0, ERRNO_LIMIT, &err))
    return answer_bad_reply(env, req, "replyErr(req, errno): errno must be an integer from 0 to 511");
  fuse_reply_err(req, (int)err);
  return NULL;
}

#define MAX_REPLY_IOV 256

/* An array of Buffers as an iovec (at most MAX_REPLY_IOV): NULL, or what is wrong with it. */
static const char *get_iovec(napi_env env, napi_value array, struct iovec *iov, uint32_t *count) {
  bool is_array = false;
  if (napi_is_array(env, array, &is_array) != napi_ok || !is_array ||
      napi_get_array_length(env, array, count) != napi_ok)
    return "buffers must be an array of Buffers";
  if (*count > MAX_REPLY_IOV) return "too many buffers in one request";
  for (uint32_t i = 0; i < *count; i++) {
    napi_value b;
    if (napi_get_element(env, array, i, &b) != napi_ok ||
        napi_get_buffer_info(env, b, &iov[i].iov_base, &iov[i].iov_len) != napi_ok)
      return "buffers must be an array of Buffers";
  }
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
  size_t argc = 2;
  napi_value argv[2];
  int64_t count;
  fuse_req_t req;
  NAPI_CALL(env, napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  if (!(req = take_req(env, argv[0]))) return NULL;
  if (!get_integer(env, argv[1], 0, UINT32_LIMIT, &count))
    return answer_bad_reply(env, req, "replyWrite(req, count): count must be an integer from 0 to 2^32-1");
  fuse_reply_write(req, (size_t)count);
  return NULL;
}

static napi_value js_reply_lseek(napi_env env, napi_callback_info info) {
  size_t argc = 2;
  napi_value argv[2];
  int64_t off;
  fuse_req_t req;
  NAPI_CALL(env, napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  if (!(req = take_req(env, argv[0]))) return NULL;
  if (!get_integer(env, argv[1], 0, INT64_LIMIT, &off))
    return answer_bad_reply(env, req, "replyLseek(req, offset): offset must be an integer from 0 to 2^63-1");
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

/* ---- host-file calls Node lacks, run on the libuv thread pool ---- */

enum { HOST_FALLOCATE, HOST_LSEEK, HOST_UMOUNT };

typedef struct {
  int kind;
  int fd;
  int mode; /* fallocate mode, lseek whence, umount2 flags */
  int64_t offset;
  int64_t length;
  char *path;
  int64_t result;
  int err;
  napi_deferred deferred;
  napi_async_work work;
} host_call;

static void host_execute(napi_env env, void *data) {
  (void)env;
  host_call *c = data;
  switch (c->kind) {
  case HOST_FALLOCATE:
    do c->result = fallocate(c->fd, c->mode, (off_t)c->offset, (off_t)c->length);
    while (c->result < 0 && errno == EINTR);
    break;
  case HOST_LSEEK:
    c->result = lseek(c->fd, (off_t)c->offset, c->mode);
    break;
  case HOST_UMOUNT:
    c->result = umount2(c->path, c->mode);
    break;
  }
  c->err = c->result < 0 ? errno : 0;
}

static void host_complete(napi_env env, napi_status status, void *data) {
  host_call *c = data;
  static const char *const names[] = {"fallocate", "lseek", "umount2"};
  napi_value v;
  if (status != napi_ok) c->err = ECANCELED;
  if (c->err == 0 && napi_create_double(env, (double)c->result, &v) == napi_ok) {
    napi_resolve_deferred(env, c->deferred, v);
  } else {
    napi_value code, msg, error, errnum;
    char text[256];
    int err = c->err ? c->err : EIO;
    snprintf(text, sizeof text, "%s: %s", names[c->kind], strerror(err));
    if (napi_create_string_utf8(env, uv_err_name(-err), NAPI_AUTO_LENGTH, &code) == napi_ok &&
        napi_create_string_utf8(env, text, NAPI_AUTO_LENGTH, &msg) == napi_ok &&
        napi_create_error(env, code, msg, &error) == napi_ok &&
        napi_create_int32(env, -err, &errnum) == napi_ok &&
        napi_set_named_property(env, error, "errno", errnum) == napi_ok) {
      napi_reject_deferred(env, c->deferred, error);
    } else {
      napi_get_undefined(env, &v);
      napi_reject_deferred(env, c->deferred, v);
    }
  }
  napi_delete_async_work(env, c->work);
  free(c->path);
  free(c);
}

static napi_value queue_host_call(napi_env env, host_call *c) {
  napi_value promise, name;
  if (napi_create_promise(env, &c->deferred, &promise) != napi_ok ||
      napi_create_string_utf8(env, "vdisk:host", NAPI_AUTO_LENGTH, &name) != napi_ok ||
      napi_create_async_work(env, NULL, name, host_execute, host_complete, c, &c->work) != napi_ok ||
      napi_queue_async_work(env, c->work) != napi_ok) {
    /* If the promise was made it stays pending forever; throwing is the honest answer. */
    free(c->path);
    free(c);
    throw_last_error(env);
    return NULL;
  }
  return promise;
}

/* fallocate(fd, mode, offset, length) -> Promise<0> */
static napi_value js_fallocate(napi_env env, napi_callback_info info) {
  size_t argc = 4;
  napi_value argv[4];
  host_call *c;
  NAPI_CALL(env, napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  if (!(c = calloc(1, sizeof *c))) return throw_errno(env, ENOMEM, "calloc");
  c->kind = HOST_FALLOCATE;
  if (napi_get_value_int32(env, argv[0], &c->fd) != napi_ok ||
      napi_get_value_int32(env, argv[1], &c->mode) != napi_ok ||
      !get_integer(env, argv[2], 0, INT64_LIMIT, &c->offset) ||
      !get_integer(env, argv[3], 0, INT64_LIMIT, &c->length)) {
    free(c);
    napi_throw_type_error(env, "ERR_VDISK_ARG", "fallocate(fd, mode, offset, length): offset and length must be integers from 0 to 2^63-1");
    return NULL;
  }
  return queue_host_call(env, c);
}

/* lseek(fd, offset, whence) -> Promise<offset>; SEEK_DATA/SEEK_HOLE past the data reject ENXIO */
static napi_value js_lseek(napi_env env, napi_callback_info info) {
  size_t argc = 3;
  napi_value argv[3];
  host_call *c;
  NAPI_CALL(env, napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  if (!(c = calloc(1, sizeof *c))) return throw_errno(env, ENOMEM, "calloc");
  c->kind = HOST_LSEEK;
  if (napi_get_value_int32(env, argv[0], &c->fd) != napi_ok ||
      !get_integer(env, argv[1], 0, INT64_LIMIT, &c->offset) ||
      napi_get_value_int32(env, argv[2], &c->mode) != napi_ok) {
    free(c);
    napi_throw_type_error(env, "ERR_VDISK_ARG", "lseek(fd, offset, whence): offset must be an integer from 0 to 2^63-1");
    return NULL;
  }
  return queue_host_call(env, c);
}

/* umount(path, flags) -> Promise<0>. On a worker thread: unmounting our own
 * mount from the thread that serves it could wait on itself. */
static napi_value js_umount(napi_env env, napi_callback_info info) {
  size_t argc = 2;
  napi_value argv[2];
  size_t len;
  host_call *c;
  NAPI_CALL(env, napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  if (!(c = calloc(1, sizeof *c))) return throw_errno(env, ENOMEM, "calloc");
  c->kind = HOST_UMOUNT;
  c->path = malloc(4096);
  if (!c->path || napi_get_value_string_utf8(env, argv[0], c->path, 4096, &len) != napi_ok ||
      napi_get_value_int32(env, argv[1], &c->mode) != napi_ok) {
    free(c->path);
    free(c);
    napi_throw_type_error(env, "ERR_VDISK_ARG", "umount(path, flags)");
    return NULL;
  }
  return queue_host_call(env, c);
}

/*
 * preadvNoWait(fd, buffers[], offset) -> bytes read, or -errno.
 * preadv2(RWF_NOWAIT) on the calling (main) thread: it only copies what is
 * already in the host page cache and answers -EAGAIN instead of waiting for
 * the disk. A cached read then costs no thread-pool round trip; the caller
 * reads the rest asynchronously.
 */
static napi_value js_preadv_nowait(napi_env env, napi_callback_info info) {
  size_t argc = 3;
  napi_value argv[3], result;
  int32_t fd;
  int64_t offset;
  uint32_t n;
  struct iovec iov[MAX_REPLY_IOV];
  ssize_t res;
  const char *bad;
  NAPI_CALL(env, napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  NAPI_CALL(env, napi_get_value_int32(env, argv[0], &fd));
  if (!get_integer(env, argv[2], 0, INT64_LIMIT, &offset)) {
    napi_throw_type_error(env, "ERR_VDISK_ARG", "preadvNoWait(fd, buffers, offset): offset must be an integer from 0 to 2^63-1");
    return NULL;
  }
  if ((bad = get_iovec(env, argv[1], iov, &n))) {
    napi_throw_type_error(env, "ERR_VDISK_ARG", bad);
    return NULL;
  }
  do res = preadv2(fd, iov, (int)n, (off_t)offset, RWF_NOWAIT);
  while (res < 0 && errno == EINTR);
  NAPI_CALL(env, napi_create_double(env, res < 0 ? -(double)errno : (double)res, &result));
  return result;
}

/* flockExclusive(fd) -> 0, or -errno (-EWOULDBLOCK: another process holds it). Never blocks. */
static napi_value js_flock_exclusive(napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value argv[1], result;
  int32_t fd;
  int res;
  NAPI_CALL(env, napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  NAPI_CALL(env, napi_get_value_int32(env, argv[0], &fd));
  do res = flock(fd, LOCK_EX | LOCK_NB);
  while (res < 0 && errno == EINTR);
  NAPI_CALL(env, napi_create_int32(env, res < 0 ? -errno : 0, &result));
  return result;
}

/* clearNonBlock(fd) -> 0, or -errno. Node cannot change an fd's flags; images are
 * opened O_NONBLOCK so that a FIFO cannot block the open (src/drivers/regular-file.ts). */
static napi_value js_clear_nonblock(napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value argv[1], result;
  int32_t fd;
  int fl, res = 0;
  NAPI_CALL(env, napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  NAPI_CALL(env, napi_get_value_int32(env, argv[0], &fd));
  fl = fcntl(fd, F_GETFL);
  if (fl < 0 || ((fl & O_NONBLOCK) && fcntl(fd, F_SETFL, fl & ~O_NONBLOCK) < 0)) res = -errno;
  NAPI_CALL(env, napi_create_int32(env, res, &result));
  return result;
}

static napi_value init(napi_env env, napi_value exports) {
  static const struct {
    const char *name;
    napi_callback fn;
  } fns[] = {
      {"mount", js_mount},           {"close", js_close},
      {"stop", js_stop},
      {"replyErr", js_reply_err},    {"replyRead", js_reply_read},
      {"replyReadAsync", js_reply_read_async},
      {"replyWrite", js_reply_write}, {"replyLseek", js_reply_lseek},
      {"replyOpen", js_reply_open},  {"replyAttr", js_reply_attr},
      {"replyStatfs", js_reply_statfs}, {"fallocate", js_fallocate},
      {"lseek", js_lseek},           {"umount", js_umount},
      {"preadvNoWait", js_preadv_nowait}, {"flockExclusive", js_flock_exclusive},
      {"clearNonBlock", js_clear_nonblock},
  };
  for (size_t i = 0; i < sizeof fns / sizeof fns[0]; i++) {
    napi_value fn;
    NAPI_CALL(env, napi_create_function(env, fns[i].name, NAPI_AUTO_LENGTH, fns[i].fn, NULL, &fn));
    NAPI_CALL(env, napi_set_named_property(env, exports, fns[i].name, fn));
  }
  NAPI_CALL(env, vdisk_register_peercred(env, exports));
  return exports;
}

NAPI_MODULE(NODE_GYP_MODULE_NAME, init)
