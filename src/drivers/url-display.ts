/**
 * Kept while drivers/qcow2 (changed on another branch) still imports it;
 * the functions live in drivers/http/url.ts. Drop once qcow2 imports from there.
 */
export { displayName, displayUrl, isHttpUrl } from './http/url.js';
