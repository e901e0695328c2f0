/*
 * peerCredentials(fd) -> [pid, uid, gid], or -errno: who is at the other end
 * of a connected UNIX socket, as the kernel recorded it when the peer called
 * listen() or connect() (SO_PEERCRED). The control-socket client uses it to
 * trust only a server run by the same user or root. Transport only: the policy
 * is in src/export/control.ts.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <sys/socket.h>
#include "vdisk_peercred.h"

static napi_value js_peer_credentials(napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value argv[1], result, v;
  int32_t fd;
  struct ucred cred;
  socklen_t len = sizeof cred;
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok || argc < 1 ||
      napi_get_value_int32(env, argv[0], &fd) != napi_ok) {
    napi_throw_type_error(env, "ERR_VDISK_ARG", "peerCredentials(fd)");
    return NULL;
  }
  if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) < 0) {
    if (napi_create_int32(env, -errno, &result) != napi_ok) return NULL;
    return result;
  }
  if (napi_create_array_with_length(env, 3, &result) != napi_ok) return NULL;
  const double fields[3] = {(double)cred.pid, (double)cred.uid, (double)cred.gid};
  for (uint32_t i = 0; i < 3; i++) {
    if (napi_create_double(env, fields[i], &v) != napi_ok || napi_set_element(env, result, i, v) != napi_ok) return NULL;
  }
  return result;
}

napi_status vdisk_register_peercred(napi_env env, napi_value exports) {
  napi_value fn;
  napi_status status = napi_create_function(env, "peerCredentials", NAPI_AUTO_LENGTH, js_peer_credentials, NULL, &fn);
  if (status != napi_ok) return status;
  return napi_set_named_property(env, exports, "peerCredentials", fn);
}
