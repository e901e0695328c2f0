/*
 * The FUSE low-level ops: each hands its request to the JS handler of the
 * same name, synchronously on the loop thread, inside a request handle
 * (vdisk_reply.c). A missing handler answers ENOSYS; if calling into JS
 * fails, the request is answered EIO here, never left waiting.
 *
 * Write data lives in libfuse's receive buffer, which the next receive
 * overwrites, so it reaches JS in a Buffer of its own (a large one is taken
 * over, a small one copied: see ll_write).
 */
#define FUSE_USE_VERSION 35
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include "vdisk_session.h"

const char *const op_names[OP_COUNT] = {
    "getattr", "setattr", "open",      "release", "read",  "write",
    "flush",   "fsync",   "fallocate", "lseek",   "statfs"};

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

const struct fuse_lowlevel_ops ll_ops = {
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
