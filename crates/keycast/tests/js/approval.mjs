// What both JS drivers (bunker-client.mjs, ndk-client.mjs) share for a request the owner must
// approve: the `auth_url`s the library reported (through its own callback), queued until the
// test collects them, and the one request started and not yet finished.

export function approvals() {
  const urls = [];
  const waiters = [];
  let pending = null;
  return {
    // The library's callback: hands the URL to whoever waits, else keeps it.
    onauth(url) {
      const waiter = waiters.shift();
      if (waiter) waiter(url);
      else urls.push(url);
    },
    // A new session: nothing collected, nothing pending.
    reset() {
      urls.length = 0;
      pending = null;
    },
    // `start_sign_event` and the like: the request runs on; `finish` collects it.
    begin(request) {
      pending = request;
      pending.catch(() => {});
      return {};
    },
    // `auth_url`: the next URL, now or once the signer sends one.
    authUrl() {
      if (urls.length) return { url: urls.shift() };
      return new Promise((resolve) => waiters.push((url) => resolve({ url })));
    },
    // `finish_sign_event`: the pending request's real answer, or its error.
    async finish() {
      if (!pending) throw new Error('no sign_event pending');
      const request = pending;
      pending = null;
      return await request;
    },
  };
}
