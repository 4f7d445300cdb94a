// Numbers and sizes as people read them.

const BYTE_UNITS = ["B", "KB", "MB", "GB", "TB"];

export function formatBytes(bytes) {
  if (!Number.isFinite(bytes)) return "–";
  let value = bytes, unit = 0;
  while (value >= 1000 && unit < BYTE_UNITS.length - 1) {
    value /= 1000;
    unit += 1;
  }
  return `${unit === 0 ? value : value.toFixed(value < 10 ? 2 : 1)} ${BYTE_UNITS[unit]}`;
}

export function formatCount(n) {
  return Number.isFinite(n) ? n.toLocaleString("en-US") : "–";
}

export function shortHash(hash) {
  return hash ? hash.slice(0, 12) : "–";
}

export function formatClock(date) {
  return date.toLocaleTimeString("en-GB", { hour12: false });
}

export function formatMs(ms) {
  return Number.isFinite(ms) ? `${Math.round(ms)} ms` : "–";
}
