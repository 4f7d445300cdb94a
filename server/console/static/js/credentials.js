// The admin token and the API key, kept in sessionStorage only: they last as long as this tab's session
// and are never written to localStorage or cookies. Views subscribe to changes to refresh themselves.

const STORAGE_KEYS = { admin: "loraplex.adminToken", apiKey: "loraplex.apiKey" };
const listeners = new Set();

function read(key) {
  try {
    return sessionStorage.getItem(key) || "";
  } catch {
    return "";  // storage disabled: the console still works, it just asks again after a reload
  }
}

function write(key, value) {
  try {
    if (value) sessionStorage.setItem(key, value);
    else sessionStorage.removeItem(key);
  } catch {
    /* storage disabled */
  }
}

export function adminToken() {
  return read(STORAGE_KEYS.admin);
}

export function apiKey() {
  return read(STORAGE_KEYS.apiKey);
}

export function saveCredentials({ admin, key }) {
  write(STORAGE_KEYS.admin, admin.trim());
  write(STORAGE_KEYS.apiKey, key.trim());
  listeners.forEach((listener) => listener());
}

export function onCredentialsChange(listener) {
  listeners.add(listener);
}
