// The "Tokens" dialog: asks for the admin token and the API key, and shows in the header what is set.

import { adminToken, apiKey, onCredentialsChange, saveCredentials } from "./credentials.js";

const asked = new Set();  // reasons already asked about automatically on this page: ask once, not every poll

export function setUpCredentialsDialog() {
  const dialog = document.getElementById("credentials-dialog");
  const form = document.getElementById("credentials-form");
  document.getElementById("credentials-open").addEventListener("click", () => openCredentials());
  dialog.addEventListener("close", () => {
    if (dialog.returnValue === "save") {
      saveCredentials({ admin: form.elements["admin-token"].value, key: form.elements["api-key"].value });
    } else if (dialog.returnValue === "forget") {
      saveCredentials({ admin: "", key: "" });
    }
  });
  onCredentialsChange(showState);
  showState();
}

function showState() {
  const parts = [adminToken() ? "Admin token set" : "No admin token set"];
  if (apiKey()) parts.push("API key set");
  document.getElementById("credentials-state").textContent = parts.join(" · ");
}

/** Open the dialog, with `reason` saying why the console asks (shown above the buttons). */
export function openCredentials(reason = "") {
  const dialog = document.getElementById("credentials-dialog");
  if (dialog.open) return;
  const form = document.getElementById("credentials-form");
  form.elements["admin-token"].value = adminToken();
  form.elements["api-key"].value = apiKey();
  const note = document.getElementById("credentials-reason");
  note.textContent = reason;
  note.hidden = !reason;
  dialog.returnValue = "";
  dialog.showModal();
  const first = reason.includes("API key") ? "api-key" : "admin-token";
  form.elements[first].focus();
}

/** Open the dialog by itself at most once per page load and reason. */
export function askOnce(reason) {
  if (asked.has(reason)) return;
  asked.add(reason);
  openCredentials(reason);
}
