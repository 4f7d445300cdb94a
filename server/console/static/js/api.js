// Calls to the server's own API. Admin routes get the admin token, inference routes the API key
// (when one is set); failures become an ApiError whose message says in plain words what happened.

import { adminToken, apiKey } from "./credentials.js";

export class ApiError extends Error {
  constructor(message, { status = 0, code = null, param = null } = {}) {
    super(message);
    this.status = status;
    this.code = code;
    this.param = param;
  }
}

export const NETWORK_ERROR = "The server could not be reached. Is it running, and is this page served by it?";

/** `scope`: "admin" (adapter admin routes) or "inference" (completions, models). */
export function authHeaders(scope) {
  const secret = scope === "admin" ? adminToken() : apiKey();
  return secret ? { Authorization: `Bearer ${secret}` } : {};
}

/** The server's OpenAI-style error body `{"error": {"message", "code", "param"}}` as an ApiError. */
export function errorFromBody(status, text) {
  let message = "", code = null, param = null;
  try {
    const body = JSON.parse(text);
    const error = body && body.error;
    if (error && typeof error === "object") {
      ({ message = "", code = null, param = null } = error);
    } else if (typeof body.detail === "string") {
      message = body.detail;
    }
  } catch {
    message = (text || "").trim().slice(0, 500);
  }
  return new ApiError(message || `HTTP ${status}`, { status, code, param });
}

const STATUS_WORDS = {
  400: "The server refused the request", 401: "Not authorised", 403: "Not allowed", 404: "Not found",
  408: "The server stopped waiting for the data", 409: "Conflict", 413: "Too large",
  429: "The server is busy; try again shortly", 503: "The server is not ready",
};

/** One sentence or two for a person: what went wrong and, where it helps, what to do. */
export function explain(error, scope) {
  if (!(error instanceof ApiError)) return String(error && error.message ? error.message : error);
  if (error.status === 0) return error.message;
  if (error.status === 401) {
    const what = scope === "admin" ? "admin token" : "API key";
    const secret = scope === "admin" ? adminToken() : apiKey();
    const state = secret ? `The ${what} is wrong` : `This server needs an ${what}`;
    return `${state} (HTTP 401). Set it with “Tokens…” at the top of the page.`;
  }
  const words = STATUS_WORDS[error.status] || "The request failed";
  const param = error.param ? ` [${error.param}]` : "";
  return `${words} (HTTP ${error.status}${param}): ${error.message}`;
}

/** A JSON call; resolves to the parsed body, rejects with an ApiError. */
export async function callJson(scope, path, { method = "GET", body } = {}) {
  const headers = { ...authHeaders(scope) };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  let response;
  try {
    response = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  } catch {
    throw new ApiError(NETWORK_ERROR);
  }
  const text = await response.text();
  if (!response.ok) throw errorFromBody(response.status, text);
  return text ? JSON.parse(text) : null;
}
