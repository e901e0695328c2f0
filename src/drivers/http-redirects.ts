/**
 * Redirects may not leave https. An https URL promises that what is read
 * comes from that server unaltered; a `Location: http://...` (a misconfigured
 * mirror, or anyone on the path of a redirecting server) would silently hand
 * the image to whoever can touch plain-text traffic. (Stricter than curl and
 * QEMU's curl driver, which follow such a redirect.)
 */
import type { Dispatcher } from 'undici';
import { VdiskError } from '../errors.js';
import { displayUrl } from './url-display.js';

/**
 * An undici interceptor placed below the redirect one (compose(this, redirect)),
 * so that it sees the request of every hop: one for an origin that is not
 * https fails with ERR_HTTP, before anything is sent there.
 */
export function httpsOnly(name: string): Dispatcher.DispatcherComposeInterceptor {
  return (dispatch) => (opts, handler) => {
    const target = new URL(opts.path, opts.origin);
    if (target.protocol === 'https:') return dispatch(opts, handler);
    const err = new VdiskError('ERR_HTTP', `${name}: redirected to ${displayUrl(target)}; refusing to leave https for plain ${target.protocol.replace(':', '')}`);
    // Answered like any failed request, but not from inside this call: undici's redirect handler
    // calls dispatch while it is still finishing the previous hop's answer.
    queueMicrotask(() => handler.onResponseError?.(null as unknown as Dispatcher.DispatchController, err));
    return true;
  };
}
