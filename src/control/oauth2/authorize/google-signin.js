// "Sign in with Google" on fhirgate's sign-in page: Google Identity Services calls this with
// the person's Google ID token, which the page posts back to fhirgate with the authorization
// request it is part of (the form's hidden fields). fhirgate verifies the token itself.
function fhirgateGoogleSignIn(response) {
  document.getElementById('google-credential').value = response.credential;
  document.getElementById('google-form').submit();
}
