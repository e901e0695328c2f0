/*
 * Host-file calls Node lacks: fallocate, lseek with SEEK_DATA/SEEK_HOLE and
 * umount2 on the libuv thread pool (each answers a Promise), and preadv2 with
 * RWF_NOWAIT, a non-blocking flock and clearing O_NONBLOCK on the calling
 * thread (each returns at once). No policy: the TS side decides when to call.
 */
#define FUSE_USE_VERSION 35
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/mount.h>
#include <sys/uio.h>
#include <unistd.h>
#include <uv.h>
#include "vdisk_addon.h"

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
  host_call *c;
  NAPI_CALL(env, napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  if (!(c = calloc(1, sizeof *c))) return throw_errno(env, ENOMEM, "calloc");
  c->kind = HOST_UMOUNT;
  c->path = malloc(PATH_MAX);
  if (!c->path || !get_string(env, argv[0], c->path, PATH_MAX) ||
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

napi_status vdisk_register_host(napi_env env, napi_value exports) {
  static const vdisk_function fns[] = {
      {"fallocate", js_fallocate},
      {"lseek", js_lseek},
      {"umount", js_umount},
      {"preadvNoWait", js_preadv_nowait},
      {"flockExclusive", js_flock_exclusive},
      {"clearNonBlock", js_clear_nonblock},
  };
  return vdisk_register_functions(env, exports, fns, sizeof fns / sizeof fns[0]);
}
